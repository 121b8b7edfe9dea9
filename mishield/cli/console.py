"""The one place for terminal output: results on stdout (`out`), progress, warnings and tables
about the run on stderr (`err`), `--json` documents on stdout.

`configure()` (called by `mishield.cli.main` on every run) rebuilds both consoles for the
current environment: no escape codes at all under NO_COLOR (rich alone would still emit bold
and cursor codes), wide lines when the stream is a log file, and `json_mode` so nothing
animated is drawn while a JSON document is being produced.
"""

from __future__ import annotations

import json
import os
import sys

from rich.console import Console

from mishield.errors import OutputError

LOG_WIDTH = 160  # rich assumes 80 columns off a terminal; module paths need more in CI logs
json_mode = False


def no_color() -> bool:
    """NO_COLOR (https://no-color.org): set and not empty means no colour, whatever the stream."""
    return bool(os.environ.get("NO_COLOR"))


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def _make(stderr: bool) -> Console:
    tty = _is_tty(sys.stderr if stderr else sys.stdout)
    return Console(
        stderr=stderr,
        highlight=False,
        width=None if tty else LOG_WIDTH,
        color_system=None if no_color() else "auto",
    )


err = _make(stderr=True)
out = _make(stderr=False)


def configure(json_output: bool = False) -> None:
    """Rebuild `err` and `out` for the current streams and environment (tests swap both)."""
    global err, out, json_mode
    err, out, json_mode = _make(stderr=True), _make(stderr=False), json_output


def animate() -> bool:
    """Whether live (redrawn) output such as progress bars may be drawn on stderr: only on a
    terminal, without NO_COLOR (a bar is cursor escape codes) and outside --json."""
    return err.is_terminal and not err.is_dumb_terminal and not no_color() and not json_mode


def emit_json(document: dict) -> None:
    """Print exactly one JSON document on stdout (the only stdout output under --json)."""
    try:
        sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        raise  # the reader left: `main` ends quietly with 141
    except OSError as err:
        # A document larger than the buffer is written straight through, so a full disk or
        # /dev/full raises here and leaves nothing in the buffer for a later flush to fail on.
        raise stdout_refused(err.strerror or str(err)) from err


def stdout_refused(cause: str) -> OutputError:
    """Standard output refused what was written: the one sentence (exit 6), with stdout pointed
    at /dev/null so that Python's own flush at exit does not print a second error."""
    silence_stdout()
    return OutputError(f"cannot write to standard output ({cause}); free space or redirect it elsewhere.")


def silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout replaced by a capture without a file descriptor
        pass
