"""One place for terminal output: tables and progress on stderr, `--json` documents on stdout."""

from __future__ import annotations

import json
import sys

from rich.console import Console

# Wide enough for module paths when stderr is a log file or a CI pipe (rich assumes 80 there).
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)


def emit_json(document: dict) -> None:
    """Print exactly one JSON document on stdout (the only stdout output under --json)."""
    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")
    sys.stdout.flush()
