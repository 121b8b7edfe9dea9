"""Progress on stderr for the long phases (prior training, attack), as a plain callback.

The library reports progress through `mishield.progress.ProgressCallback` and never imports
rich itself; the CLI passes the callback this context manager yields. Updates only touch host
counters, so calling it every attack step costs no device synchronisation.

On a terminal the callback drives rich progress bars. Anywhere else (a CI log, `nohup`, Docker,
a redirected stderr), under NO_COLOR and under --json it prints plain lines instead: one when
a phase starts, at 25/50/75/100 % and at most every `PLAIN_INTERVAL_S` seconds in between, each
with the numbers a bar would show, so a log shows the run is alive and how far it is.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

PLAIN_INTERVAL_S = 10.0


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@dataclass
class _Phase:
    start: float
    last_print: float
    quarter: int = -1  # last quarter (0..4) printed
    done: int = 0


class PlainProgress:
    """A ProgressCallback that writes whole lines through `write`, rate-limited."""

    def __init__(self, write: Callable[[str], None], interval: float = PLAIN_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.write, self.interval, self.clock = write, interval, clock
        self.phases: dict[str, _Phase] = {}

    def __call__(self, description: str, done: int, total: int) -> None:
        now = self.clock()
        phase = self.phases.get(description)
        if phase is None or done < phase.done:  # a new phase may reuse a label
            phase = self.phases[description] = _Phase(start=now, last_print=now)
        moved = done > phase.done
        phase.done = done
        quarter = min(4, 4 * done // total) if total > 0 else 0
        if quarter > phase.quarter or (moved and now - phase.last_print >= self.interval):
            phase.quarter, phase.last_print = max(quarter, phase.quarter), now
            self.write(self.line(description, done, total, now - phase.start))

    @staticmethod
    def line(description: str, done: int, total: int, elapsed: float) -> str:
        percent = f" ({100 * done / total:.0f} %)" if total > 0 else ""
        text = f"{description}: {done}/{total}{percent}, {_clock(elapsed)} elapsed"
        if 0 < done < total:
            text += f", ~{_clock(elapsed / done * (total - done))} left"
        return text


@contextlib.contextmanager
def progress_bars(enabled: bool = True, plain: bool | None = None) -> Iterator[Callable[[str, int, int], None] | None]:
    """Yield a progress callback (None when disabled): rich bars where `console.animate()`
    allows them, plain lines otherwise or when `plain` is True."""
    if not enabled:
        yield None
        return
    from mishield.cli import console

    if plain if plain is not None else not console.animate():
        yield PlainProgress(lambda text: console.err.print(text, markup=False, highlight=False, soft_wrap=True))
        return
    yield from _rich_bars(console.err)


def _rich_bars(err) -> Iterator[Callable[[str, int, int], None]]:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

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
