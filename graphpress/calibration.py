"""Calibration data from a text or token file named in the spec (``calibration.text`` / ``.tokens``).

The token stream is cut into ``samples`` windows of ``seq_len`` tokens at offsets drawn
with the calibration seed, so the same spec calibrates on the same windows.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .errors import SpecError
from .schema.passes import DistillDataConfig
from .schema.spec import CalibrationConfig


def calibration_from_files(
    cfg: CalibrationConfig | DistillDataConfig,
    tokenize: Callable[[str], list[int]] | None,
    held_out: int = 0,
    section: str = "calibration",
) -> tuple[list[tuple], list[tuple]] | None:
    """Batches (1, seq_len) from ``cfg.text`` or ``cfg.tokens``, and ``held_out`` more that share no token
    position with them (fewer where the file has no room); None when the spec names neither. Errors name
    ``{section}.text`` (or ``.tokens``)."""
    if cfg.text is None and cfg.tokens is None:
        return None
    stream = token_stream(cfg.text, cfg.tokens, tokenize, section, cfg.seq_len)
    starts = window_starts(stream, cfg.samples, cfg.seq_len, cfg.seed)
    others = disjoint_starts(len(stream), starts, held_out, cfg.seq_len, cfg.seed + 1)
    return tuple([(stream[s : s + cfg.seq_len].unsqueeze(0).clone(),) for s in chosen] for chosen in (starts, others))


def token_stream(
    text: str | None,
    tokens: str | None,
    tokenize: Callable[[str], list[int]] | None,
    section: str,
    seq_len: int,
    max_tokens: int | None = None,
) -> torch.Tensor:
    """One 1-D int64 token sequence from ``{section}.text`` (a UTF-8 file, gzip allowed; a .jsonl file's "text"
    fields joined by blank lines), tokenized with the model's tokenizer, or from ``{section}.tokens``; its first
    ``max_tokens``, refused when that is shorter than one window of ``{section}.seq_len``."""
    stream = torch.as_tensor(np.asarray(_ids(text, tokens, tokenize, section), dtype=np.int64))[:max_tokens]
    if len(stream) < seq_len:
        field = f"{section}.text" if text is not None else f"{section}.tokens"
        raise SpecError([(field, f"holds {len(stream)} tokens, fewer than {section}.seq_len={seq_len}; lower seq_len")])
    return stream


def _ids(text: str | None, tokens: str | None, tokenize, section: str) -> list[int]:
    if text is not None:
        if tokenize is None:
            raise SpecError(
                [
                    (
                        f"{section}.text",
                        "the model has no tokenizer (a checkpoint folder without tokenizer files, or a model "
                        f"directory without tokenize()); give {section}.tokens, a file of token ids, instead",
                    )
                ]
            )
        return tokenize(_text(text, f"{section}.text"))
    return _token_file(tokens, f"{section}.tokens")


def _text(path: str, field: str) -> str:
    data = _read(path, field)
    name = path.removesuffix(".gz")
    if path.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise SpecError([(field, f"{path!r} is not a readable gzip file: {exc}")]) from None
    text = data.decode("utf-8", errors="replace")
    if not name.endswith(".jsonl"):
        return text
    documents = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SpecError([(field, f"{path!r} line {number}: not JSON ({exc.msg})")]) from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise SpecError([(field, f"{path!r} line {number}: expected an object with a string 'text' field")])
        documents.append(row["text"])
    return "\n\n".join(documents)


def window_starts(stream: torch.Tensor, samples: int, seq_len: int, seed: int) -> list[int]:
    """``samples`` window starts in ``stream`` (at least ``seq_len`` tokens, see :func:`token_stream`), seeded."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, len(stream) - seq_len + 1, (samples,), generator=gen).tolist()


def disjoint_starts(length: int, taken: list[int], count: int, seq_len: int, seed: int) -> list[int]:
    """Up to ``count`` window starts, drawn with ``seed``, whose windows share no position with ``taken``'s
    (nor each other's): text the calibration did not see, for verification."""
    covered = torch.zeros(length, dtype=torch.bool)
    for start in taken:
        covered[start : start + seq_len] = True
    chosen: list[int] = []
    for start in torch.randperm(length - seq_len + 1, generator=torch.Generator().manual_seed(seed)).tolist():
        if len(chosen) == count:
            break
        if not covered[start : start + seq_len].any():
            chosen.append(start)
            covered[start : start + seq_len] = True
    return chosen


def _read(path: str, field: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SpecError([(field, f"cannot read {path!r}: {exc.strerror or exc}")]) from None


def _token_file(path: str, field: str) -> list[int]:
    suffix = Path(path).suffix
    if suffix not in (".npy", ".pt", ".json"):
        raise SpecError([(field, f"{path!r}: expected a .npy, .pt or .json file of token ids")])
    data = _read(path, field)
    try:
        if suffix == ".npy":
            ids = np.load(io.BytesIO(data), allow_pickle=False)
        elif suffix == ".pt":
            ids = torch.load(io.BytesIO(data), weights_only=True)
        else:
            ids = json.loads(data)
        ids = np.asarray(ids)
    except Exception as exc:
        raise SpecError([(field, f"cannot read token ids from {path!r}: {exc}")]) from None
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise SpecError([(field, f"{path!r} holds {ids.dtype} of shape {ids.shape}; expected 1-D integer token ids")])
    return ids.tolist()
