"""Triton fused compressed linears vs the dense fp16 linear on one GPU, side by side in one run.

    .venv/bin/python -m benchmarks.cuda_kernels [--shapes 4096x4096,11008x4096] [--batches 1,16]

For each weight shape (out x in) and batch: dense fp16 ``F.linear`` and the 2:4, 4-bit LUT
and shift kernels on the same random weights; median time (``triton.testing.do_bench``),
speed-up over dense, and achieved bandwidth (bytes of weight storage + activations read
and written / time). Then decode attention at ``--context`` cached tokens: MLA's absorbed
form (32 heads over one 576-wide latent key, 512-wide values) and a GQA cache (32 heads,
8 KV heads, 128 wide) in fp16 and KIVI 2-bit, each against torch's SDPA on the dense
fp16 cache, with the bandwidth of reading the cache. Needs a CUDA device: without one it
says so and exits 0, so the benchmark stays ready for a machine that has one. Goals (issue
9): 2:4 >= 1.3x and 4-bit LUT >= 2.5x over dense fp16 at batch 1; MLA decode attention
>= 80% of the GPU's peak memory bandwidth.
"""

from __future__ import annotations

import argparse

import torch

from graphpress.ir.ops.bitstream import pack_bits
from graphpress.ir.ops.shift import encode, exponent_bits


def variants(out_features: int, in_features: int, device: str) -> dict:
    """name -> (callable of x, weight storage bytes)."""
    from graphpress.backends.cuda.kernels import implementations

    k = implementations()
    gen = torch.Generator().manual_seed(0)
    dense = torch.randn(out_features, in_features, generator=gen).half()
    codes = torch.randint(0, 16, (out_features, in_features), generator=gen)
    indices, codebook = pack_bits(codes, 4), torch.randn(out_features // 64, 16, generator=gen).half()
    kept_at = torch.stack(
        [torch.randperm(4, generator=gen)[:2].sort().values for _ in range(out_features * in_features // 4)]
    )
    positions = pack_bits(kept_at.reshape(out_features, -1), 2)
    values = torch.randn(out_features, in_features // 2, generator=gen).half()
    scale = dense.float().abs().amax(1)
    shift_codes = pack_bits(encode(dense.float(), scale, -6, 0), exponent_bits(-6, 0) + 1)
    t = {name: v.to(device) for name, v in dict(
        dense=dense, indices=indices, codebook=codebook, positions=positions, values=values,
        scale=scale.half(), shift_codes=shift_codes).items()}  # fmt: skip
    nbytes = {name: v.numel() * v.element_size() for name, v in t.items()}
    return {
        "dense fp16": (lambda x: torch.nn.functional.linear(x, t["dense"]), nbytes["dense"]),
        "2:4 sparse": (
            lambda x: k["nm_linear"](x, t["values"], t["positions"], 2, 4, in_features),
            nbytes["values"] + nbytes["positions"],
        ),
        "4-bit LUT": (
            lambda x: k["lut_linear"](x, t["indices"], t["codebook"], 4, in_features, 64),
            nbytes["indices"] + nbytes["codebook"],
        ),
        "shift [-6,0]": (
            lambda x: k["shift_linear"](x, t["shift_codes"], t["scale"], -6, 0, in_features),
            nbytes["shift_codes"] + nbytes["scale"],
        ),
    }


def attention_variants(context: int, device: str) -> dict:
    """name -> (callable, cache bytes read) for one decode step at ``context`` tokens."""
    from graphpress.backends.cuda.kernels import implementations
    from graphpress.ir.ops.kv_quant import kv_quantize_reference

    k = implementations()
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).half().to(device)

    sdpa = torch.nn.functional.scaled_dot_product_attention
    q_mla, latent, values = rand(1, 32, 1, 576), rand(1, 1, context, 576), rand(1, 1, context, 512)
    q, keys, vals = rand(1, 32, 1, 128), rand(1, 8, context, 128), rand(1, 8, context, 128)
    kq = kv_quantize_reference(keys.float(), 2, 32, True, False)
    vq = kv_quantize_reference(vals.float(), 2, 32, False, False)
    recent = rand(1, 8, 0, 128)
    quant_bytes = sum(t.numel() * t.element_size() for t in (*kq, *vq))
    gqa = dict(enable_gqa=True)
    return {
        "MLA sdpa fp16": (lambda: sdpa(q_mla, latent, values, enable_gqa=True),
                          (latent.numel() + values.numel()) * 2),
        "MLA triton": (lambda: k["decode_attention"](q_mla, latent, values, 576**-0.5),
                       (latent.numel() + values.numel()) * 2),
        "GQA sdpa fp16": (lambda: sdpa(q, keys, vals, **gqa), (keys.numel() + vals.numel()) * 2),
        "GQA triton fp16": (lambda: k["decode_attention"](q, keys, vals, 128**-0.5), (keys.numel() + vals.numel()) * 2),
        "KIVI-2 triton": (lambda: k["quantized_decode_attention"](q, *kq, *vq, recent, recent, 2, 32, 2, 32, 128**-0.5),
                          quant_bytes),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--context", type=int, default=4096)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device here: nothing to time (run this on a machine with an NVIDIA GPU)")
        return
    from triton.testing import do_bench

    print(f"device: {torch.cuda.get_device_name()}")
    print(f"{'shape':>12} {'batch':>5} {'kernel':>13} {'ms':>8} {'vs dense':>8} {'GB/s':>7} ")
    for shape in args.shapes.split(","):
        out_features, in_features = map(int, shape.split("x"))
        runs = variants(out_features, in_features, "cuda")
        for batch in map(int, args.batches.split(",")):
            x = torch.randn(batch, in_features, device="cuda").half()
            dense_ms = None
            for name, (run, weight_bytes) in runs.items():
                run(x)  # autotune, compile
                ms = do_bench(lambda run=run, x=x: run(x), warmup=25, rep=200)
                dense_ms = dense_ms or ms
                moved = weight_bytes + 2 * batch * (in_features + out_features)
                print(f"{shape:>12} {batch:>5} {name:>13} {ms:8.4f} {dense_ms / ms:7.2f}x {moved / ms / 1e6:7.0f}")
    print(f"\ndecode attention, {args.context} cached tokens, batch 1")
    print(f"{'kernel':>16} {'ms':>8} {'GB/s':>7}")
    for name, (run, cache_bytes) in attention_variants(args.context, "cuda").items():
        run()
        ms = do_bench(run, warmup=25, rep=200)
        print(f"{name:>16} {ms:8.4f} {cache_bytes / ms / 1e6:7.0f}")


if __name__ == "__main__":
    main()
