"""`AuditConfig`: everything that decides an audit besides the files it reads.

    config = AuditConfig.preset("default", max_attack_acc=0.5, attacks="ppa,lomma")
    report = mishield.audit(models, data=..., prior=..., eval_model=..., config=config)

The attack's budget is an `AttackConfig` (`mishield.attack.config`) built from a named preset
(docs/audit.md, "Presets"); `AuditConfig.preset` takes the budget's fields (samples, candidates,
iterations, ...) and the audit's (max_attack_acc, seeds, ...) side by side and sends each to its
place. `mishield audit`'s options map onto these fields one to one (`mishield.cli.audit_cmd`).
No torch here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from mishield.attack.config import AttackConfig, BlackBoxConfig, make_config
from mishield.errors import UsageError

# AttackConfig's fields an AuditConfig constructor accepts beside its own.
ATTACK_FIELDS = tuple(f.name for f in dataclasses.fields(AttackConfig) if f.name != "preset")


@dataclass(frozen=True)
class AuditConfig:
    """How to audit: the attack budget, which attacks, how many repeats, the gate and the options.

    `attack`: the budget (`AttackConfig`, from a preset). `attacks`: names in
    `mishield.attack.attacks.ATTACKS` ("ppa", "lomma", "blackbox", "blackbox-labels", "transfer";
    a comma-separated string or a sequence), None for the default set (ppa and blackbox, with lomma
    and transfer where every model has surrogates: `default_attacks`); every model is judged by its
    worst case. `blackbox`: the black-box attack's search (`BlackBoxConfig`; its generations
    default to half of I). `classes`: the attacked class ids ("0-9,17", a list,
    or None for all). `seeds`: repeats with seeds seed, seed + 1, ..., pooled per class.
    `max_attack_acc`: the privacy gate (None: no gate). `allow_weak_evaluator` (smoke tests only,
    never with a gate) and `allow_weak_budget` turn two refusals into warnings. `val_fraction`:
    the seeded hold-out of a private folder without val/ (default 10 %). `load_options` go to
    `mishield.load_model` for each audited model (arch, num_classes, input_size, mean, std);
    `eval_arch` is the evaluation models' architecture where their files record none.
    `provenance` is recorded in report.json's `options` (the CLI records its command line there).
    `feature_metrics`: FID, precision / recall / density / coverage and the KNN judge in the
    feature spaces of `mishield.audit.feature_spaces` (docs/audit.md; off only to save their time).
    """

    attack: AttackConfig = field(default_factory=make_config)
    attacks: tuple[str, ...] | None = None
    classes: str | tuple[int, ...] | None = None
    seeds: int = 1
    max_attack_acc: float | None = None
    allow_weak_evaluator: bool = False
    allow_weak_budget: bool = False
    val_fraction: float | None = None
    device: str = "auto"
    overwrite: bool = False
    trust_checkpoint: bool = False
    load_options: dict | None = None
    eval_arch: str | None = None
    provenance: dict | None = None
    feature_metrics: bool = True
    blackbox: BlackBoxConfig = field(default_factory=BlackBoxConfig)

    def __post_init__(self) -> None:
        if isinstance(self.attacks, str):
            object.__setattr__(self, "attacks", tuple(a.strip() for a in self.attacks.split(",")))
        elif self.attacks is not None:
            object.__setattr__(self, "attacks", tuple(self.attacks))
        if isinstance(self.classes, list):
            object.__setattr__(self, "classes", tuple(self.classes))
        self.validate()

    @classmethod
    def preset(cls, name: str = "default", **options) -> AuditConfig:
        """The preset's attack budget (`mishield.attack.config.PRESETS`: ci, default, ppa-facescrub,
        ppa-celeba, koh2024-facescrub) with any budget or audit field of `options` set."""
        budget = {k: options.pop(k) for k in list(options) if k in ATTACK_FIELDS}
        return cls(attack=make_config(name, **budget), **options)

    def replace(self, **changes) -> AuditConfig:
        """A copy with `changes` applied; budget fields (samples, iterations, ...) change `attack`."""
        budget = {k: changes.pop(k) for k in list(changes) if k in ATTACK_FIELDS}
        attack = dataclasses.replace(self.attack, **budget).validate() if budget else self.attack
        return dataclasses.replace(self, attack=attack, **changes)

    def validate(self) -> AuditConfig:
        from mishield.attack.attacks import parse_attacks

        if self.attacks is not None:
            parse_attacks(list(self.attacks))
        self.blackbox.validate()
        if self.seeds < 1:
            raise UsageError(f"`seeds` must be at least 1, got {self.seeds}.")
        if self.max_attack_acc is not None and not 0.0 <= self.max_attack_acc <= 1.0:
            raise UsageError(f"`max_attack_acc` is a fraction between 0 and 1 (0.4 means 40 %), got {self.max_attack_acc}.")
        if self.allow_weak_evaluator and self.max_attack_acc is not None:
            raise UsageError("`allow_weak_evaluator` is for smoke tests and cannot be combined with the `max_attack_acc` gate.")
        return self


# The keyword arguments `mishield.audit` took before AuditConfig, and where each one went.
LEGACY_KEYWORDS = ("preset", "attack", "classes", "device", "max_attack_acc", "overwrite", "load_options", "eval_arch",
                   "trust_checkpoint", "provenance", "seeds", "allow_weak_evaluator", "allow_weak_budget",
                   "val_fraction", "attacks")  # fmt: skip


def from_keywords(keywords: dict) -> AuditConfig:
    """An AuditConfig from the former keyword form (`preset=`, `attack={...}`, `max_attack_acc=`, ...)."""
    unknown = sorted(set(keywords) - set(LEGACY_KEYWORDS))
    if unknown:
        raise UsageError(f"`audit` got unexpected keyword argument(s) {', '.join(unknown)}; its options are the fields of `config` (AuditConfig).")
    options = {k: v for k, v in keywords.items() if k not in ("preset", "attack") and v is not None}
    return AuditConfig.preset(keywords.get("preset") or "default", **{**(keywords.get("attack") or {}), **options})
