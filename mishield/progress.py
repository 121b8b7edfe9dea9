"""The one way the library reports progress: a plain callback, so it never depends on a terminal.

    def progress(description: str, done: int, total: int) -> None: ...

Long phases (training epochs, prior training, the attack) call it with host-side counters only,
so reporting costs no device synchronisation. The CLI passes a rich implementation
(`mishield.cli.progress`); library users pass their own, or None for silence.
"""

from __future__ import annotations

from collections.abc import Callable

ProgressCallback = Callable[[str, int, int], None]
