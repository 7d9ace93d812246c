"""Error types. Each names what the user should change: a spec field, a graph node, a module."""

from __future__ import annotations


def first_line(exc: BaseException, empty: str | None = None) -> str:
    """The first line of an exception's message, for one-line errors that wrap it (``empty``, else its type, if none)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else (empty or type(exc).__name__)


class GraphpressError(Exception):
    """Base class of every error graphpress raises on purpose."""


class SpecError(GraphpressError, ValueError):
    """The spec is invalid. ``problems`` holds (json_path, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]], source: str | None = None):
        self.problems = problems
        self.source = source
        where = f" in {source}" if source else ""
        lines = [f"invalid spec{where}:"] + [f"  {path}: {msg}" for path, msg in problems]
        super().__init__("\n".join(lines))


class CaptureError(GraphpressError):
    """torch.export could not capture the model; the message names the op or module that failed."""


class PassPreconditionError(GraphpressError):
    """A pass's ``requires`` does not hold for the graph it was given."""


class PassPostconditionError(GraphpressError):
    """A pass broke its own ``ensures`` promise: a bug in the pass."""


class VerificationError(GraphpressError):
    """The compressed graph drifted from the original beyond the spec's ``verify`` threshold."""


class BackendError(GraphpressError):
    """A backend could not lower, write or validate its artifact."""


class OutputError(GraphpressError):
    """The output directory cannot take this run's files (not a directory, not writable, busy, full)."""


class ArtifactMismatchError(GraphpressError):
    """A file of a run's output directory is not the one its manifest.json lists: a run is publishing
    there, was killed while it did, or the file was changed since."""


class ShapeError(GraphpressError, ValueError):
    """Inputs of a shape the captured graph does not take; the message names the input and dimension."""
