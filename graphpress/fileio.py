"""Publishing files atomically: written in a staging directory, moved under their final names
when finished, so a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path


@contextlib.contextmanager
def staging_dir(out_dir: Path) -> Iterator[Path]:
    """A scratch directory inside ``out_dir``; removed whatever happens.

    Writers (backends, the report, a whole run) put files there and :func:`publish_all`
    moves finished ones into ``out_dir`` with ``os.replace`` (atomic on
    one file system), so an interrupted run never leaves a half-written file under its
    final name.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".staging-", dir=out_dir))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_all(staged_dir: Path, out_dir: Path, last: Sequence[Path] = (), mirror: Sequence[str] = ()) -> None:
    """Move every file under ``staged_dir`` to the same place under ``out_dir``, ``last`` (final paths)
    in that order after the rest: an artifact after the data it refers to, the report after both.

    ``mirror`` names subdirectories whose content is replaced as a whole: files an earlier
    publication left there that this one does not bring are removed.
    A symbolic link where a subdirectory of ``out_dir`` goes (``OUT/plots -> elsewhere``) is
    replaced by a real directory, never written or cleaned through: nothing outside
    ``out_dir`` is touched.
    """
    order = {Path(p): k for k, p in enumerate(last)}
    moves = [(src, out_dir / src.relative_to(staged_dir)) for src in staged_dir.rglob("*") if src.is_file()]
    for src, dst in sorted(moves, key=lambda m: (order.get(m[1], -1), str(m[1]))):
        _real_dirs(out_dir, dst.parent)
        os.replace(src, dst)
    published = {dst for _, dst in moves}
    for sub in mirror:
        _real_dirs(out_dir, out_dir / sub)
        for stale in (out_dir / sub).glob("*"):
            if (stale.is_file() or stale.is_symlink()) and stale not in published:
                stale.unlink()


def _real_dirs(root: Path, directory: Path) -> None:
    """Make every directory from ``root`` down to ``directory`` a real one (a symlink among them is unlinked)."""
    current = root
    for part in directory.relative_to(root).parts:
        current = current / part
        if current.is_symlink():
            current.unlink()
        current.mkdir(exist_ok=True)
