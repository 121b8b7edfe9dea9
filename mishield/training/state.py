"""The one resumable-state format every trainer writes (target fine-tuning, prior training,
evaluation-model training).

A state is a weights-only-loadable torch file (`torch.load(..., weights_only=True)`: plain
tensors and containers, never code) holding

    {"format": "mishield-train-state", "version": 1, "kind": "classifier" | "prior",
     "epoch": completed epochs, "fingerprint": {what defines the run}, ...the trainer's payload}

It is replaced atomically after every completed epoch, so a crash, Ctrl-C or SIGTERM leaves the
previous complete state. Resuming checks the fingerprint (recipe, data, model, input size) and
refuses a state from a different run; a damaged file or one of another format is bad input
(exit 3); one from a newer mishield asks for an upgrade (exit 3).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from mishield.errors import BadInputError, UsageError
from mishield.fileio import atomic_output

STATE_FORMAT = "mishield-train-state"
STATE_VERSION = 1

logger = logging.getLogger("mishield.training")


def state_path_for(out: Path) -> Path:
    """The resumable state a trainer writes beside its output while it runs."""
    out = Path(out)
    return out.with_name(out.name + ".train-state")


def save_state(path: Path, state: dict) -> None:
    """Atomically replace the resumable training state (weights-only loadable)."""
    with atomic_output(path, overwrite=True) as tmp:
        torch.save(state, tmp)


def new_state(kind: str, epoch: int, fingerprint: dict, **payload) -> dict:
    return {"format": STATE_FORMAT, "version": STATE_VERSION, "kind": kind, "epoch": int(epoch),
            "fingerprint": fingerprint, **payload}


def load_state(path: Path, kind: str = "classifier") -> dict:
    """Read a state file, refusing damaged, foreign, newer-format and other-trainer files (exit 3)."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a damaged zip
        raise BadInputError(
            f"{path} is not a readable training state ({type(err).__name__}); delete it and start over."
        ) from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise BadInputError(f"{path} is not a mishield training state; point --resume at the file a run left.")
    if not isinstance(state.get("version", 0), int) or state.get("version", 0) > STATE_VERSION:
        raise BadInputError(f"{path} was written by a newer mishield; upgrade mishield to resume it.")
    if state.get("kind", "classifier") != kind:  # states written before "kind" existed are classifier states
        raise BadInputError(f"{path} is the state of a {state.get('kind')} training run, not of a {kind} run.")
    if not isinstance(state.get("epoch"), int) or not isinstance(state.get("fingerprint", {}), dict):
        raise BadInputError(f"{path} is a damaged training state (no epoch count); delete it and start over.")
    return state


def check_fingerprint(path: Path, saved: dict, current: dict) -> None:
    """Refuse (exit 3) a state whose run differs from this one in anything that defines it."""
    for key, value in current.items():
        if key in saved and saved[key] != value:
            shown = lambda v: json.dumps(v, default=str)[:80]
            raise BadInputError(
                f"{path} was made by a different run ({key} was {shown(saved[key])}, now {shown(value)}); "
                "rerun with the original settings to resume, or pass --overwrite to start over."
            )


def resume_state(path: Path | None, resume: bool, fingerprint: dict, kind: str = "classifier",
                 required: tuple[str, ...] = ()) -> dict | None:
    """The saved state to continue from (checked against this run), or None for a fresh start.

    Asking to resume when there is no state is not an error (the run simply starts), but it is
    said on the `mishield.training` logger, so it never happens silently.
    """
    if not resume:
        return None
    if path is None or not Path(path).exists():
        where = f"at {path}" if path is not None else "(no state file was given)"
        logger.warning("nothing to resume %s; starting from the first epoch.", where)
        return None
    state = load_state(Path(path), kind)
    missing = [key for key in required if key not in state]
    if missing:
        raise BadInputError(f"{path} is a damaged training state (no {missing[0]!r}); delete it and start over.")
    check_fingerprint(Path(path), state.get("fingerprint", {}), fingerprint)
    return state


def refuse_stale_state(path: Path, resume: bool, overwrite: bool) -> None:
    """Before a run starts: a state left by an interrupted run is continued or explicitly dropped."""
    if path.exists() and not resume:
        if overwrite:
            path.unlink()
            return
        raise UsageError(f"{path} holds an interrupted run; pass --resume to continue it or --overwrite to start over.")


def model_signature(model: nn.Module) -> str:
    """A short digest of the parameter and buffer names and shapes: same architecture, same signature."""
    text = ";".join(f"{k}:{tuple(v.shape)}" for k, v in model.state_dict().items())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def data_signature(items: Iterable[tuple[str, int]]) -> str:
    """A short digest of the training images (class folder, file name and label, in order).

    Not full paths, so a data folder that moved still resumes; one with other, added or removed
    images does not.
    """
    digest = hashlib.sha256()
    for path, label in items:
        p = Path(path)
        digest.update(f"{p.parent.name}/{p.name}\t{label}\n".encode())
    return digest.hexdigest()[:16]


def rescale_lr(state: dict, ratio: float) -> None:
    """Scale a saved optimizer's and scheduler's learning rates (a resumed run may lower --lr)."""
    for group in state["optimizer"].get("param_groups", []):
        group["lr"] *= ratio
        if "initial_lr" in group:
            group["initial_lr"] *= ratio
    sched = state["scheduler"]
    sched["base_lrs"] = [b * ratio for b in sched.get("base_lrs", [])]
    sched["_last_lr"] = [b * ratio for b in sched.get("_last_lr", [])]
