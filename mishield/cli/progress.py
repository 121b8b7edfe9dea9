"""Progress bars on stderr for the long phases (prior training, attack), as a plain callback.

The library reports progress through `mishield.progress.ProgressCallback` and never imports
rich itself; the CLI passes the callback this context manager yields. Updates only touch host
counters, so calling it every attack step costs no device synchronisation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping


@contextlib.contextmanager
def progress_bars(enabled: bool = True) -> Iterator[Callable[[str, int, int], None] | None]:
    if not enabled:
        yield None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from mishield.cli.console import err

    tasks: dict[str, int] = {}
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        console=err, transient=False,
    ) as bars:  # fmt: skip

        def update(description: str, done: int, total: int) -> None:
            task = tasks.get(description)
            if task is None or bars.tasks[task].completed > done:  # a new phase reuses the label
                task = tasks[description] = bars.add_task(description, total=total)
            bars.update(task, completed=done, total=total)

        yield update


def epoch_printer(enabled: bool = True) -> Callable[[Mapping[str, object]], None] | None:
    """The `on_epoch` callback of the trainers: one plain line per epoch on stderr.

    Plain text on purpose: it is the whole record of a run whose stderr is a log file, and above a
    live bar it reads the same.
    """
    if not enabled:
        return None
    from mishield.cli.console import err
    from mishield.progress import format_epoch

    def print_epoch(record: Mapping[str, object]) -> None:
        err.print(format_epoch(record), markup=False, highlight=False, soft_wrap=True)

    return print_epoch
