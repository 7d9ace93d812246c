"""Train TinyLlama on the Python standard library's sources (bytes), on the CPU.

    python -m examples.tiny_llama.train            # writes model.safetensors, config.json, train_log.json

The run is seeded; on two CPU cores it takes about half an hour. The committed
checkpoint came from this script with its defaults; ``train_log.json`` records
the loss curve and the final held-out perplexity.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from graphpress.metrics import perplexity

from .data import load_split, stdlib_corpus, write_shipped_splits
from .model import HERE, TinyLlama, TinyLlamaConfig, init_weights, save_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(HERE))
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    write_shipped_splits()
    train = torch.frombuffer(bytearray(stdlib_corpus("train")), dtype=torch.uint8).long()
    heldout = load_split("heldout")
    print(f"train bytes {len(train):,}  held-out bytes {len(heldout):,}")

    model = TinyLlama(TinyLlamaConfig())
    init_weights(model, args.seed)
    print(f"params {sum(p.numel() for p in model.parameters()):,}")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    gen = torch.Generator().manual_seed(args.seed)
    log, start = [], time.time()
    model.train()
    for step in range(args.steps):
        starts = torch.randint(0, len(train) - args.seq_len - 1, (args.batch,), generator=gen)
        batch = torch.stack([train[s : s + args.seq_len + 1] for s in starts.tolist()])
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            elapsed = time.time() - start
            print(f"step {step:5d}  loss {loss.item():.4f}  lr {lr_at(step):.2e}  {elapsed:7.1f}s", flush=True)
            log.append({"step": step, "loss": round(loss.item(), 4), "seconds": round(elapsed, 1)})

    model.eval()
    save_model(model, args.out)
    from .model import load_model

    ppl = perplexity(load_model(args.out), heldout, seq_len=256)
    print(f"held-out perplexity (bytes, seq_len 256): {ppl:.4f}")
    summary = {"args": vars(args), "heldout_ppl": round(ppl, 4), "wall_seconds": round(time.time() - start, 1)}
    with open(f"{args.out}/train_log.json", "w") as f:
        json.dump({**summary, "log": log}, f, indent=1)


if __name__ == "__main__":
    main()
