"""The family x pass matrix with measured errors: what each pass does on every decoder family.

    .venv/bin/python -m benchmarks.families [--families llama,qwen3] [--passes qkvo_lock,low_rank]

Each family is a small model from its default config (tests/families.py: 2 layers, hidden
64, random weights); each cell compresses it with one pass, calibrated on two (2, 16)
batches, and prints the relative L2 error of the logits against the original on held-out
ids at batch 3 and length 14 (decode graphs teacher-forced), or the refusal's reason. The
suite asserts the same bounds (tests/test_families.py); this prints the figures.
"""

from __future__ import annotations

import argparse

import torch

from graphpress.errors import PassPreconditionError
from graphpress.metrics import logits_of
from graphpress.runtime import TorchDecoder, teacher_forced_logits
from tests.families import EXACT, FAMILIES, LOSSY, build, matrix_config, run_pass, token_ids


def cell(model, pass_name: str) -> str:
    mode, config = matrix_config(model, pass_name)
    try:
        result, report = run_pass(model, mode, config)
    except PassPreconditionError as error:
        return "refused: " + str(error).split("' ", 1)[-1].split(";")[0]
    ids = token_ids(3, 14, seed=2)
    with torch.no_grad():
        expected = model(ids).logits
        graph = result.graph
        got = teacher_forced_logits(TorchDecoder(graph), ids) if graph.cache is not None else logits_of(graph(ids))
    error = ((got - expected).norm() / expected.norm()).item()
    kind = "exact" if pass_name in EXACT else "lossy"
    return f"{kind} {error:.1e} ({len(report['layers'])} layers)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--passes", default=",".join([*EXACT, *LOSSY]))
    args = parser.parse_args()
    passes = args.passes.split(",")
    print("| family | " + " | ".join(passes) + " |")
    print("|---" * (len(passes) + 1) + "|")
    for name in args.families.split(","):
        model = build(name)
        print(f"| {name} | " + " | ".join(cell(model, p) for p in passes) + " |", flush=True)


if __name__ == "__main__":
    main()
