"""Whether this process is one rank of a torchrun job: the one place that reads torchrun's environment.

torchrun starts every process with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set.
A single stray variable (`RANK=1` left in a shell or a container image) used to turn a plain run
into "rank 1 of a job", which writes nothing and exits 0; so only the complete set means torchrun,
and a partial one is a usage error (docs/reliability.md). No torch here: the CLI, `fileio`'s
output lock and `mishield.runtime` all ask this module.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from mishield.errors import UsageError

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Launch:
    """This process's place in its job: rank 0 of 1 outside torchrun."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 reports, writes the outputs and holds their locks; the other ranks only compute."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def _whole(environ: Mapping[str, str], name: str, minimum: int) -> int:
    text = environ[name]
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise UsageError(f"the environment variable {name}={text!r} is not a whole number of at least {minimum}; "
                         "torchrun sets it, so launch with torchrun or unset it.")
    return value


def torchrun_launch(environ: Mapping[str, str] | None = None) -> Launch:
    """This process's `Launch`, from torchrun's environment (`os.environ` unless `environ` is given).

    None of TORCHRUN_VARIABLES set: a plain run (rank 0 of 1). All of them: a torchrun rank, checked
    (0 <= RANK < WORLD_SIZE). Some but not all: `UsageError` (exit 2) naming what is set and what is
    missing, before any work.
    """
    env = os.environ if environ is None else environ
    present = [name for name in TORCHRUN_VARIABLES if env.get(name, "") != ""]
    if not present:
        return Launch()
    missing = [name for name in TORCHRUN_VARIABLES if name not in present]
    if missing:
        raise UsageError(
            f"the environment sets {', '.join(f'{n}={env[n]}' for n in present)} but not {', '.join(missing)}: "
            "a partial torchrun environment; unset the stray variable(s) for a plain run, or launch with torchrun."
        )
    world = _whole(env, "WORLD_SIZE", 1)
    rank = _whole(env, "RANK", 0)
    if rank >= world:
        raise UsageError(f"the environment sets RANK={rank} but WORLD_SIZE={world}; a rank must be below the world "
                         "size, so launch with torchrun or unset both.")
    return Launch(rank=rank, world=world, local_rank=_whole(env, "LOCAL_RANK", 0))
