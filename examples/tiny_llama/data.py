"""Text for TinyLlama: the Python standard library's own sources, as bytes.

The corpus is available offline on every machine with CPython. Files are split
by a hash of their name (about 1 in 10 held out), so the held-out text is code
the model never saw. The held-out and calibration slices used for evaluation
are shipped in ``data/`` (gzip), so evaluation does not depend on the local
Python installation; only ``train.py`` reads the standard library.
"""

from __future__ import annotations

import gzip
import hashlib
import sysconfig
from pathlib import Path

import torch

DATA_DIR = Path(__file__).resolve().parent / "data"
SHIPPED_SPLITS = {"heldout": 262_144, "calibration": 131_072}  # bytes kept in the repo


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(root.glob("*.py"))


def is_heldout(path: Path) -> bool:
    return hashlib.sha1(path.name.encode()).digest()[0] % 10 == 0


def stdlib_corpus(split: str) -> bytes:
    """'train' or 'heldout' bytes of the local standard library (used by train.py)."""
    want_heldout = split == "heldout"
    return b"\n".join(p.read_bytes() for p in stdlib_files() if is_heldout(p) == want_heldout)


def write_shipped_splits() -> None:
    """Freeze the evaluation slices into the repo: held-out text and a calibration slice of train."""
    DATA_DIR.mkdir(exist_ok=True)
    train = stdlib_corpus("train")
    sources = {"heldout": stdlib_corpus("heldout"), "calibration": train[len(train) // 2 :]}
    for name, size in SHIPPED_SPLITS.items():
        with gzip.GzipFile(DATA_DIR / f"{name}.txt.gz", "wb", mtime=0) as f:
            f.write(sources[name][:size])


def load_split(name: str) -> torch.Tensor:
    """The shipped 'heldout' or 'calibration' text as a 1-D int64 tensor of byte ids."""
    if name not in SHIPPED_SPLITS:
        raise ValueError(f"unknown split {name!r}; expected one of {sorted(SHIPPED_SPLITS)}")
    raw = gzip.decompress((DATA_DIR / f"{name}.txt.gz").read_bytes())
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()


def random_windows(tokens: torch.Tensor, count: int, seq_len: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - seq_len, (count,), generator=gen)
    return [tokens[s : s + seq_len] for s in starts.tolist()]
