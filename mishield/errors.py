"""The error hierarchy. Each class carries the process exit code the CLI uses (docs/architecture.md §7).

Messages are one sentence that says what went wrong and what to do about it; the CLI prints
them as they are (tracebacks only with MISHIELD_DEBUG=1).
"""


class MishieldError(Exception):
    """Base class: an internal error (exit code 1)."""

    exit_code = 1


class UsageError(MishieldError):
    """The command line asks for something impossible or contradictory (exit code 2)."""

    exit_code = 2


class BadInputError(MishieldError):
    """A model, checkpoint or data file cannot be used as given (exit code 3)."""

    exit_code = 3


class PrivacyGateError(MishieldError):
    """An audited model leaks more than `--max-attack-acc` allows (exit code 4)."""

    exit_code = 4


class ParityError(MishieldError):
    """The exported ONNX model does not compute what the PyTorch model computes (exit code 5)."""

    exit_code = 5


class OutputError(MishieldError):
    """An output cannot be written: a full disk, a read-only file system, no permission, or a
    standard output that refuses data (exit code 6). The inputs and the command line were fine,
    so the same command can succeed once the named path or stream is fixed."""

    exit_code = 6


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message (its type name when it has none), for
    the one-sentence errors mishield prints in place of tracebacks."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return (lines[0] if lines else type(err).__name__)[:limit]
