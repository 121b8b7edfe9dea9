"""The attack's budget and knobs: `AttackConfig` and its named presets (docs/audit.md, "Presets").

PPA's S, C, I, K, A and the optimiser's lr, betas and schedule, plus the crops and the loss. Fields
left at None come from the prior's latent space (`AttackConfig.resolve`): z-space and w-space need
different budgets. No torch here: a config can be built, checked and recorded without it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

from mishield.errors import UsageError

if TYPE_CHECKING:
    from mishield.attack.priors import Prior

BUDGET_FIELDS = ("lr", "iterations", "betas", "milestones", "gamma")
# Counter ranges of the attacks' hashed randomness (`mishield.attack.augment`): optimisation crops
# use [0, FINAL_COUNTER_BASE), final selection FINAL_COUNTER_BASE onward.
FINAL_COUNTER_BASE = 1 << 20
BLACKBOX_MODES = ("scores", "labels")
# The black-box attack's default generations per gradient step of the same audit (I): one knob, -I,
# sizes every attack, and -I 0 makes every attack selection only. docs/audit.md "The black-box
# attack" gives the measurement behind the ratio.
GENERATIONS_PER_STEP = 0.5


@dataclass(frozen=True)
class AttackConfig:
    """S, C, I, K, A and the rest of PPA's knobs; `PRESETS` holds named defaults.

    `lr`, `iterations`, `betas`, `milestones` and `gamma` left at None come from the prior's
    latent space (`Prior.budget`, via `resolve`): z-space and w-space need different budgets.
    `milestones` cut the lr by `gamma` (MultiStepLR); a value in (0, 1) is a fraction of the
    run, a value >= 1 a step number; `()` means no schedule.
    """

    samples: int = 1000  # S: initial-selection pool
    candidates: int = 50  # C: kept per class for optimisation
    iterations: int | None = None  # I: Adam steps (None: the prior's default)
    keep: int = 20  # K: final reconstructions per class
    final_augmentations: int = 20  # A: crops scoring each candidate at final selection
    batch_size: int = 256
    seed: int = 0
    lr: float | None = None  # None: the prior's default
    betas: tuple[float, float] | None = None
    milestones: tuple[float, ...] | None = None
    gamma: float | None = None
    truncation: float = 0.5
    center_crop: float | None = None  # fraction of each side of the prior's image; None: the prior's default
    compile: bool = False
    selection_baseline: bool = True  # also select from the un-optimised candidates (I = 0)
    preset: str = "default"
    step_scale: tuple[float, float] = (0.9, 1.0)
    step_ratio: tuple[float, float] = (1.0, 1.0)
    final_scale: tuple[float, float] = (0.5, 0.9)
    final_ratio: tuple[float, float] = (0.8, 1.2)
    final_flip: float = 0.5
    loss: str = "poincare"  # the identity loss, a name in mishield.attack.losses.LOSSES
    feature_weight: float | None = None  # the `logit` loss's lambda; None: LOSSES[loss].default_weight

    def validate(self) -> AttackConfig:
        for name in ("samples", "candidates", "keep", "final_augmentations", "batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"`{name}` must be at least 1, got {getattr(self, name)}.")
        if self.iterations is not None and self.iterations < 0:
            raise UsageError(f"`iterations` must be at least 0, got {self.iterations}.")
        if self.candidates > self.samples:
            raise UsageError(f"`candidates` ({self.candidates}) cannot exceed `samples` ({self.samples}).")
        if self.keep > self.candidates:
            raise UsageError(f"`keep` ({self.keep}) cannot exceed `candidates` ({self.candidates}).")
        if self.milestones is not None and any(m <= 0 for m in self.milestones):
            raise UsageError(f"`milestones` are fractions in (0, 1) or step numbers >= 1, got {list(self.milestones)}.")
        if self.center_crop is not None and not 0.0 < self.center_crop <= 1.0:
            raise UsageError(f"`center_crop` is a fraction of the image side in (0, 1], got {self.center_crop}.")
        # The loss registry lives with the losses, which need torch: imported only to check the name.
        from mishield.attack.losses import LOSSES

        if self.loss not in LOSSES:
            raise UsageError(f"`loss` must be one of {', '.join(LOSSES)}, got {self.loss!r}.")
        # A loss without a feature term ignores `feature_weight`: one config serves every attack of an audit.
        if self.feature_weight is not None and (not math.isfinite(self.feature_weight) or self.feature_weight < 0):
            raise UsageError(f"`feature_weight` must be a finite number >= 0, got {self.feature_weight}.")
        return self

    def resolve(self, prior: Prior) -> AttackConfig:
        """This config with every budget field left at None filled from the prior's latent space."""
        defaults = {**prior.budget, **PRESET_PRIOR_BUDGETS.get(self.preset, {}).get(prior.kind, {})}
        filled = {k: defaults[k] for k in BUDGET_FIELDS if getattr(self, k) is None}
        if "betas" in filled:
            filled["betas"] = tuple(filled["betas"])
        if "milestones" in filled:
            filled["milestones"] = tuple(filled["milestones"])
        return replace(self, **filled).validate() if filled else self

    def milestone_steps(self) -> list[int]:
        """The steps at which the lr is cut (sorted, within the run); needs a resolved config."""
        steps = {round(m * self.iterations) if m < 1 else int(m) for m in (self.milestones or ())}
        return sorted(s for s in steps if 0 < s < (self.iterations or 0))

    def lr_at(self, step: int) -> float:
        """The lr of optimiser step `step` (0-based) under the MultiStep schedule."""
        cuts = sum(1 for m in self.milestone_steps() if m <= step)
        return self.lr * (self.gamma if self.gamma is not None else 1.0) ** cuts

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class BlackBoxConfig:
    """The evolution strategy's knobs; the pool, C, K, A, batch size and seed come from `AttackConfig`.

    Defaults chosen on the embedded Fashion-MNIST at 32 px (a 64-d DCGAN prior trained on classes
    5-9, a tiny ResNet target on 0-4, S 200, C 16, K 8, A 8; mean target confidence of the kept
    images, selection alone 0.53, PPA's 100 z-space steps 0.64): at the same 640 queries per
    candidate 80 x 8 reached 0.76 and 40 x 16 0.73; at 320, 40 x 8 0.71 and 20 x 16 0.69, so small
    populations over more generations pay best per query; 50 x 8 (400) reached 0.73. sigma 0.5 and
    lr 0.1 beat 0.25 / 0.05 (0.70 at 40 x 8) and 1.0 / 0.2 (0.64 at 20 x 16).
    """

    mode: str = "scores"  # "scores" (output probabilities) or "labels" (top-1 labels only)
    generations: int | None = None  # None: GENERATIONS_PER_STEP x the gradient attacks' I (`resolve`); 50 at I = 100
    population: int = 8  # per candidate and generation; even (antithetic pairs)
    sigma: float = 0.5  # search radius, in units of the prior's per-coordinate spread
    lr: float = 0.1  # Adam step, in units of the prior's per-coordinate spread
    betas: tuple[float, float] = (0.9, 0.999)  # Adam's moments average the noisy estimates over generations
    crops: int | None = None  # per population member and generation; None: 1 for scores, 4 for labels
    label_growth: float = 1.25  # labels mode: sigma x this when a candidate's whole population stayed in the class
    label_max_growth: float = 4.0
    query_batch: int | None = None  # images per target pass; None: 4 x AttackConfig.batch_size (no backward pass to store)

    def validate(self) -> BlackBoxConfig:
        if self.mode not in BLACKBOX_MODES:
            raise UsageError(f"`mode` must be one of {', '.join(BLACKBOX_MODES)}, got {self.mode!r}.")
        if self.generations is not None and self.generations < 0:
            raise UsageError(f"`generations` must be at least 0, got {self.generations}.")
        if self.population < 2 or self.population % 2:
            raise UsageError(f"`population` must be an even number of at least 2 (antithetic pairs), got {self.population}.")
        for name in ("sigma", "lr"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (name == "sigma" and value == 0):
                raise UsageError(f"`{name}` must be a finite number {'> 0' if name == 'sigma' else '>= 0'}, got {value}.")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise UsageError(f"`betas` must lie in [0, 1), got {list(self.betas)}.")
        if self.crops is not None and self.crops < 1:
            raise UsageError(f"`crops` must be at least 1, got {self.crops}.")
        if self.query_batch is not None and self.query_batch < 1:
            raise UsageError(f"`query_batch` must be at least 1, got {self.query_batch}.")
        if self.label_growth < 1.0 or self.label_max_growth < 1.0:
            raise UsageError("`label_growth` and `label_max_growth` must be at least 1.")
        if (self.generations or 0) * self.crops_per_member > FINAL_COUNTER_BASE:
            raise UsageError(f"`generations` x `crops` must stay below {FINAL_COUNTER_BASE} (the final selection's crops start there).")
        return self

    @property
    def crops_per_member(self) -> int:
        return self.crops if self.crops is not None else (1 if self.mode == "scores" else 4)

    @property
    def queries_per_candidate(self) -> int:
        """Target queries (images) one candidate's optimisation costs (needs `generations`: see `resolve`)."""
        if self.generations is None:
            raise ValueError("`generations` is not set; resolve the config against the audit's AttackConfig first.")
        return self.generations * self.population * self.crops_per_member

    def resolve(self, attack: AttackConfig) -> BlackBoxConfig:
        """This config with `generations` filled from a resolved attack config's I (GENERATIONS_PER_STEP per step)."""
        if self.generations is not None:
            return self.validate()
        if attack.iterations is None:
            raise ValueError("resolve the AttackConfig against its prior before the black-box config.")
        return replace(self, generations=math.ceil(GENERATIONS_PER_STEP * attack.iterations)).validate()

    def to_dict(self) -> dict:
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        per = None if self.generations is None else self.queries_per_candidate
        return {**d, "crops": self.crops_per_member, "queries_per_candidate": per}



# Named budgets and where each number comes from (docs/audit.md, "Presets"). Fields a preset
# leaves out come from the prior (`AttackConfig.resolve`).
PRESETS: dict[str, dict] = {
    # mishield's own, sized for CI on the embedded 32 px data: small S/C/K/A, the prior's steps.
    "ci": {"samples": 200, "candidates": 16, "keep": 8, "final_augmentations": 8},
    # mishield's calibrated default: the prior's budget (z-space: 100 steps at lr 0.05 with cuts at
    # 60 % / 80 %, from bench/audit_calibration.py's curve) and the pool of the former `quick`.
    "default": {"samples": 1000, "candidates": 50, "keep": 20, "final_augmentations": 20},
    # PPA, LukasStruppek/Plug-and-Play-Attacks configs/attacking/default_attacking_local.yaml
    # (FaceScrub): search_space_size 2000, num_candidates 200, num_epochs 50, samples_per_target 50,
    # final_selection iterations 100, Adam lr 0.005 betas [0.1, 0.1], MultiStepLR [30, 40] x0.1.
    "ppa-facescrub": {"samples": 2000, "candidates": 200, "iterations": 50, "keep": 50, "final_augmentations": 100,
                      "lr": 0.005, "betas": (0.1, 0.1), "milestones": (30, 40), "gamma": 0.1},
    # PPA, configs/attacking/CelebA_FFHQ.yaml: search_space_size 5000, num_candidates 200,
    # num_epochs 70, samples_per_target 50, iterations 100, Adam lr 0.005 betas [0.1, 0.1], no scheduler.
    "ppa-celeba": {"samples": 5000, "candidates": 200, "iterations": 70, "keep": 50, "final_augmentations": 100,
                   "lr": 0.005, "betas": (0.1, 0.1), "milestones": (), "gamma": 0.1},
    # Koh et al. (ECCV 2024) FaceScrub runs as stated in issue 8: S=2000, C=16, I=50, K=8, A=100,
    # lr x0.1 at steps 30 and 40. S, I, A, lr, betas and the schedule equal PPA's FaceScrub config
    # above; C=16 and K=8 could not be checked (the paper's code ships as supplementary material,
    # not in a public repository we could read).
    "koh2024-facescrub": {"samples": 2000, "candidates": 16, "iterations": 50, "keep": 8, "final_augmentations": 100,
                          "lr": 0.005, "betas": (0.1, 0.1), "milestones": (30, 40), "gamma": 0.1},
}
# Per prior kind, preset-specific budget defaults (used where the config leaves a field at None).
PRESET_PRIOR_BUDGETS: dict[str, dict[str, dict]] = {
    "ci": {"pixels": {"iterations": 200}},  # DeepInversion's 2000 steps are too many for CI
}
# Former names: `quick` was the default audit's size (now `default`, with the calibrated steps);
# `paper` held PPA's CelebA numbers although it was labelled FaceScrub.
DEPRECATED_PRESETS = {"quick": "default", "paper": "ppa-celeba"}


def make_config(preset: str = "default", **overrides) -> AttackConfig:
    """A preset's values with every non-None override applied on top."""
    if preset in DEPRECATED_PRESETS:
        new = DEPRECATED_PRESETS[preset]
        warnings.warn(f"the attack preset {preset!r} is deprecated; it now means {new!r}.", FutureWarning, stacklevel=2)
        preset = new
    if preset not in PRESETS:
        raise UsageError(f"`preset` must be one of {', '.join(PRESETS)}, got {preset!r}.")
    values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}, "preset": preset}
    for key in ("betas", "milestones"):
        if values.get(key) is not None:
            values[key] = tuple(values[key])
    return AttackConfig(**values).validate()
