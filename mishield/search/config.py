"""`SearchConfig`: how `search_defences` searches, besides the files it reads.

    config = SearchConfig(base=HardenConfig(batch_size=64, epochs=20), grid="default",
                          search_epochs=2, max_acc_drop=0.02)

`base` holds every candidate's training options (schedule, lr, batch size, BiDO, seed, device,
...); `base.epochs` is the full fine-tuning the pick gets at the end, `search_epochs` the short one
each candidate gets. The grid sets each candidate's surgery and loss / data defences, so `base`
must leave those (`alpha`, `neg_ls`, `erase`) unset; `base.method` is replaced by each candidate's.
No torch here (a config from a lazy import stays cheap; validation may import the attack presets).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mishield.errors import UsageError
from mishield.hardening import DEFAULT_EPOCHS_WITH_DATA, HardenConfig
from mishield.search.grid import Candidate, resolve_grid

if TYPE_CHECKING:
    from mishield.audit.config import AuditConfig
    from mishield.training.evaluator import EvalModelConfig
    from mishield.training.prior import PriorTrainingConfig

DEFAULT_SEARCH_EPOCHS = 2
DEFAULT_MAX_ACC_DROP = 0.02
DEFAULT_PRESET = "ci"  # the audit budget of the search: mishield's fast preset (docs/audit.md "Presets")
# HardenConfig fields the grid sets, or that would change what a candidate is compared with.
_NOT_IN_BASE = {"alpha": None, "neg_ls": None, "neg_ls_start": None, "neg_ls_ramp": None, "erase": None, "freeze_stages": 0,
                "public_epochs": None, "reset_head": False, "resume": False, "overwrite": False}


@dataclass(frozen=True)
class SearchConfig:
    """A privacy/utility search over a grid of stacked defences (see `search_defences`).

    `base`: the `HardenConfig` every candidate trains with (see the module doc). `grid`: a name in
    `mishield.search.grid.GRIDS` ("default", "quick") or a sequence of `Candidate`s.
    `search_epochs`: each candidate's short fine-tuning. `max_acc_drop`: the natural-accuracy
    budget, a fraction (0.02 = 2 points) below the original's, on the same held-out images.
    `audit`: the `AuditConfig` of the one audit of all candidates (default the "ci" preset on
    `base.device` and `base.seed`; it must set no gate). `remeasure`: audit the fully fine-tuned
    pick again against the original. `prior_training` / `eval_training`: how to train the audit's
    prior (from `public`) and evaluation model (from `data`) when none is given.
    `load_options` go to `mishield.load_model` for the original model. `overwrite` replaces the
    outputs and starts the search over; without it a rerun with the same options continues.
    """

    base: HardenConfig = field(default_factory=HardenConfig)
    grid: str | Sequence[Candidate] = "default"
    search_epochs: int = DEFAULT_SEARCH_EPOCHS
    max_acc_drop: float = DEFAULT_MAX_ACC_DROP
    audit: AuditConfig | None = None
    remeasure: bool = True
    prior_training: PriorTrainingConfig | None = None
    eval_training: EvalModelConfig | None = None
    load_options: dict | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.grid, str):
            object.__setattr__(self, "grid", tuple(self.grid))
        self.validate()

    def replace(self, **changes) -> SearchConfig:
        return dataclasses.replace(self, **changes)

    def validate(self) -> SearchConfig:
        if not isinstance(self.base, HardenConfig):
            raise UsageError(f"`base` must be a HardenConfig, got {type(self.base).__name__}.")
        set_in_base = [k for k, off in _NOT_IN_BASE.items() if getattr(self.base, k) != off]
        if set_in_base:
            raise UsageError(f"`{set_in_base[0]}` is not an option of the search's candidates (the grid chooses the "
                             "surgery and defences; `overwrite` is the search's own); leave it out of `base`.")
        for candidate in resolve_grid(self.grid):
            self.base.replace(**candidate.changes())  # the surgery and defences checked as `harden` checks them
        if isinstance(self.search_epochs, bool) or not isinstance(self.search_epochs, int) or self.search_epochs < 1:
            raise UsageError(f"`search_epochs` must be a whole number of epochs, 1 or more, got {self.search_epochs!r}.")
        drop = self.max_acc_drop
        if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not math.isfinite(drop) or not 0.0 <= drop <= 1.0:
            raise UsageError(f"`max_acc_drop` is a fraction between 0 and 1 (0.02 means 2 points), got {drop!r}.")
        if self.audit is not None and self.audit.max_attack_acc is not None:
            raise UsageError("the search ranks candidates and does not gate them; leave `max_attack_acc` out of `audit` "
                             "and gate the result with `mishield audit --max-attack-acc`.")
        return self

    @property
    def candidates(self) -> tuple[Candidate, ...]:
        return resolve_grid(self.grid)

    @property
    def full_epochs(self) -> int:
        return DEFAULT_EPOCHS_WITH_DATA if self.base.epochs is None else self.base.epochs

    def audit_config(self) -> AuditConfig:
        """The audit every candidate shares: the original loaded with `load_options` (its
        `trust_checkpoint` is the audit's own field), overwrite on (the search owns its folders)."""
        from mishield.audit.config import AuditConfig

        config = self.audit or AuditConfig.preset(DEFAULT_PRESET, device=self.base.device, seed=self.base.seed)
        load = dict(self.load_options or {})
        trust = bool(load.pop("trust_checkpoint", False)) or config.trust_checkpoint
        return config.replace(overwrite=True, load_options=load or None, trust_checkpoint=trust)

    def candidate_config(self, candidate: Candidate, epochs: int, resume: bool) -> HardenConfig:
        """`base` with the candidate's surgery and defences, trained for `epochs`."""
        return self.base.replace(**candidate.changes(), epochs=epochs, resume=resume, overwrite=not resume)

    def to_dict(self) -> dict[str, Any]:
        """What OUT.search.json records under `options` (and, without the selection's fields, what
        a rerun must share to continue)."""
        audit = self.audit_config()
        return {
            "base": {f.name: _plain(getattr(self.base, f.name)) for f in dataclasses.fields(self.base)},
            "grid": self.grid if isinstance(self.grid, str) else "custom",
            "candidates": [c.to_dict() for c in self.candidates],
            "search_epochs": self.search_epochs,
            "full_epochs": self.full_epochs,
            "max_acc_drop": self.max_acc_drop,
            "remeasure": self.remeasure,
            "audit": {**audit.attack.to_dict(), "attacks": None if audit.attacks is None else list(audit.attacks), "seeds": audit.seeds,
                      "classes": _plain(audit.classes), "allow_weak_evaluator": audit.allow_weak_evaluator},
            "prior_training": None if self.prior_training is None else dataclasses.asdict(self.prior_training),
            "eval_training": None if self.eval_training is None else _plain(dataclasses.asdict(self.eval_training)),
            "load_options": _plain(self.load_options),
        }


def _plain(value):
    """JSON-ready: tuples as lists, devices and paths as text."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
