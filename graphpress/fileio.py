"""Publishing files atomically: written in a staging directory, moved under their final names
when finished, so a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import ArtifactMismatchError, OutputError


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
        with on_termination(lambda: shutil.rmtree(tmp, ignore_errors=True)):
            yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_CLEANUPS: list = []
"""What :func:`clean_up_now` undoes: the staging directories and output claims now open, oldest first."""


@contextlib.contextmanager
def on_termination(cleanup) -> Iterator[None]:
    """Run ``cleanup`` if the process is terminated (SIGTERM, see :func:`clean_up_now`) inside this block."""
    _CLEANUPS.append(cleanup)
    try:
        yield
    finally:
        _CLEANUPS.remove(cleanup)


def clean_up_now() -> None:
    """Remove every open staging directory and output claim, newest first (for a signal handler).

    A signal can arrive inside any library call, where an exception raised from the handler
    may be turned into another error or swallowed; so the handler cleans up itself and exits.
    """
    for cleanup in reversed(list(_CLEANUPS)):
        with contextlib.suppress(OSError):
            cleanup()


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


LOCK_NAME = ".graphpress.lock"
MANIFEST = "manifest.json"


@contextlib.contextmanager
def claimed_output(out_dir: Path) -> Iterator[Path]:
    """``out_dir`` checked, created if needed and locked for one run, before the run does any work.

    Refused with an :class:`OutputError` naming the problem: a file or a dangling symlink
    where the directory should be, a directory that cannot be created or written, or one
    another run holds (an exclusive ``flock`` on ``OUT/.graphpress.lock``). While the lock
    is held, ``.staging-*`` directories left by killed runs are removed. Running out of
    space inside is an ``OutputError`` saying where. On failure a directory the run
    created is removed again (if nothing else was put there); our lock file always goes, another
    run's never.
    """
    out_dir = Path(out_dir)
    if out_dir.is_symlink() and not out_dir.exists():
        raise OutputError(f"{out_dir}: a symlink to {os.readlink(out_dir)}, which does not exist")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a directory; give --out a directory")
    created = not out_dir.exists()
    fd: int | None = None

    def release() -> None:
        """Our lock file and a directory we created, if still empty. Registered before either exists, so a
        signal at any moment of the claim finds it; the lock file goes only once the lock is ours (or no one's)."""
        if _unclaimed(fd, out_dir):
            (out_dir / LOCK_NAME).unlink(missing_ok=True)
        if created and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()

    with on_termination(release):
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(out_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(f"{out_dir}: cannot write here: {exc.strerror or exc}") from None
        try:
            _lock(fd, out_dir)
            for leftover in out_dir.glob(".staging-*"):
                shutil.rmtree(leftover, ignore_errors=True)
            try:
                yield out_dir
            except BaseException as exc:
                release()
                if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    where = exc.filename or out_dir
                    raise OutputError(
                        f"{out_dir}: no space left on the device (writing {where}); nothing was published"
                    ) from None
                raise
        finally:
            if _unclaimed(fd, out_dir):
                (out_dir / LOCK_NAME).unlink(missing_ok=True)
            os.close(fd)


def _unclaimed(fd: int | None, out_dir: Path) -> bool:
    """Whether this process holds the lock on ``out_dir`` through ``fd``, or no one does (a signal came before
    ``fd`` was ours): then its lock file may go. Another run's lock file stays."""
    try:
        probe = fd if fd is not None else os.open(out_dir / LOCK_NAME, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        if probe != fd:
            os.close(probe)


def _lock(fd: int, out_dir: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise OutputError(
            f"{out_dir}: another graphpress run is writing here (it holds {LOCK_NAME}); wait for it or give another --out"
        ) from None
    if os.fstat(fd).st_ino != os.stat(out_dir / LOCK_NAME).st_ino:  # the holder removed it as we opened it
        raise OutputError(f"{out_dir}: another graphpress run just finished here; run again")


def write_manifest(out_dir: Path, stage: Path, files: Sequence[Path], earlier: dict | None = None) -> Path:
    """Stage ``manifest.json``: this run's files (relative path -> bytes, sha256) over ``earlier`` entries.

    Published last, so a manifest only ever lists files that are in place.
    """
    entries = dict(earlier or {})
    for path in sorted(files):
        staged = stage / path.relative_to(out_dir)
        entries[str(path.relative_to(out_dir))] = {"bytes": staged.stat().st_size, "sha256": _sha256(staged)}
    (stage / MANIFEST).write_text(json.dumps({"files": entries}, indent=1, sort_keys=True) + "\n")
    return out_dir / MANIFEST


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_entries(out_dir: Path) -> dict:
    """The ``files`` of OUT's manifest ({} without a readable one)."""
    try:
        listed = json.loads((out_dir / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return listed if isinstance(listed, dict) else {}


def verify_published(path: str | Path) -> None:
    """Refuse a file whose directory's manifest lists it with other bytes (:class:`ArtifactMismatchError`).

    Publication moves a run's files one by one and its manifest last, so while a run
    publishes, or after one was killed while it did, a new artifact can sit beside an old
    report. Readers that check here see a consistent run or this error, never a mix. A file
    no manifest lists (none beside it, a copy taken elsewhere) is not checked.
    """
    path = Path(path)
    entry = manifest_entries(path.parent).get(path.name)
    if not isinstance(entry, dict) or not path.is_file():
        return
    if path.stat().st_size != entry.get("bytes") or _sha256(path) != entry.get("sha256"):
        raise ArtifactMismatchError(
            f"{path}: not the file {path.parent / MANIFEST} lists (other size or SHA-256): a graphpress run is "
            f"publishing into {path.parent}, was killed while it did, or the file was changed since; run again, "
            f"or remove {MANIFEST} to trust the files as they are"
        )


def previous_run_files(out_dir: Path) -> set[Path]:
    """The files an earlier run's manifest lists (only those: nothing else in OUT is ever removed)."""
    files = set()
    for name in manifest_entries(out_dir):
        path = Path(name)
        if not path.is_absolute() and ".." not in path.parts:
            files.add(out_dir / path)
    return files


def remove_stale(out_dir: Path, previous: set[Path], current: set[Path]) -> None:
    """Remove what an earlier run wrote and this one did not (a stale model.onnx beside a new other.onnx)."""
    for path in sorted(previous - current):
        if path.is_file() or path.is_symlink():
            path.unlink()
