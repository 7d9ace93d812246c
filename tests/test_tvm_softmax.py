"""tvm_softmax: the hand-scheduled softmax rows (scale, causal) against torch, on every path."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("tvm")

from graphpress.backends.tvm_softmax import LANES, PARALLEL_VALUES, softmax_kernel  # noqa: E402


def run(shape, scale: float, causal: str | None, cpu: str, x: torch.Tensor | None = None) -> torch.Tensor:
    import tvm

    target = tvm.target.Target("llvm" if cpu == "generic" else {"kind": "llvm", "mcpu": cpu})
    lib = tvm.compile(tvm.IRModule({"main": softmax_kernel(len(shape), scale, causal)}), target=target)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape))) * 4 if x is None else x
    out = tvm.runtime.tensor(torch.empty(shape).numpy())
    lib["main"](tvm.runtime.tensor(x.numpy()), out)
    return x, torch.from_numpy(out.numpy())


def expected(x: torch.Tensor, scale: float, causal: str | None) -> torch.Tensor:
    logits = x * scale
    if causal is not None:
        length, keys = x.shape[-2:]
        shift = keys - length if causal == "BottomRight" else 0
        keep = torch.arange(keys)[None] <= torch.arange(length)[:, None] + shift
        logits = logits.masked_fill(~keep, float("-inf"))
    return torch.softmax(logits, -1)


CASES = {  # shape, scale, causal
    "rows, ragged": ((3, 70), 1.0, None),
    "fewer keys than a vector": ((2, 5, 9), 1.0, None),
    "heads, scaled": ((2, 3, 5, 37), 0.125, None),
    "causal prompt": ((1, 4, 40, 40), 0.25, "TopLeft"),
    "causal chunk after a past": ((1, 2, 7, 50), 0.25, "BottomRight"),
    "decode step": ((1, 8, 1, 2 * LANES + 3), 1.0, "BottomRight"),
    "parallel rows": ((1, 4, 64, PARALLEL_VALUES // 256 + 45), 0.5, "TopLeft"),
}


@pytest.mark.parametrize("cpu", ["generic", "host"])
@pytest.mark.parametrize("case", list(CASES))
def test_rows_match_torch(case, cpu):
    import tvm

    shape, scale, causal = CASES[case]
    x, ours = run(shape, scale, causal, tvm.target.codegen.llvm_get_system_cpu() if cpu == "host" else cpu)
    torch.testing.assert_close(ours, expected(x, scale, causal), rtol=5e-6, atol=1e-7)
    if causal is not None:  # keys after the diagonal are exactly 0, and each row still sums to 1
        assert torch.equal(ours == 0, expected(x, scale, causal) == 0)
    torch.testing.assert_close(ours.sum(-1), torch.ones(shape[:-1]), rtol=1e-5, atol=1e-5)


def test_extreme_logits_stay_finite():
    """Rows spanning the float32 range (a mask's lowest value, a row of one large logit) give no inf or nan."""
    x = torch.tensor([[torch.finfo(torch.float32).min, 0.0, 88.0, -88.0] * 5, [1e30] + [0.0] * 19])
    _, ours = run(x.shape, 1.0, None, "generic", x)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, torch.softmax(x, -1), rtol=5e-6, atol=1e-7)
