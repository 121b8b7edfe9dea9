"""The training recipe: schedule, epochs, optimiser and LR decay, batch size, seed, and the
defences that change the loss or the data: BiDO, label smoothing, random erasing, partial freezing.

The recipe is the paper's (Adam, betas (0.9, 0.999), MultiStepLR at 75 % and 90 % of all epochs,
gamma 0.1, batch 128). Its lr 1e-3 is for fine-tuning from ImageNet weights; for a checkpoint
already trained on the private data we default to 1e-4 (`default_lr`), so the surgery's
perturbation is repaired without washing out what earlier training learned.

The defences. `bido` (BiDO's HSIC terms, `mishield.training.bido`) is recorded as null when off,
as it always was; the three later ones are None or 0 when off and then absent from `to_dict`, so
a recipe without them records, and fingerprints for `--resume`, exactly what it did before they
existed:

* `label_smoothing`: (negative) label smoothing with its epoch schedule
  (`mishield.training.smoothing`; Struppek et al., ICLR 2024).
* `erase`: (p, min_area, max_area) random erasing of training images (`mishield.data.random_erasing`;
  MIDRE, TMLR 2025; their setting is (1.0, 0.1, 0.8), `MIDRE_ERASE`).
* `freeze_stages`: N > 0 trains with the stem and the first N stages frozen, their batch-norm
  statistics included (`mishield.training.freezing`; TL-DMI, Ho et al., CVPR 2024). It applies
  to every stage of the schedule: both TTS stages and finetune train on the private data.

`noise` is not a defence of the trained model but of an audit's judge: Gaussian noise of that
standard deviation (in [0, 1] pixel units) added to every training image makes perturbations made
against the target carry over to an evaluation model less often (`mishield.data.GaussianNoise`;
`train-eval` uses 0.25, measured in docs/audit.md "Evaluation models").
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from mishield.defences import MIDRE_ERASE, check_erase
from mishield.errors import UsageError
from mishield.training.bido import BiDOConfig
from mishield.training.smoothing import LabelSmoothing

SCHEDULES = ("tts", "finetune")
# mishield.data.AUGMENTATIONS' names (named here: the recipe is checked without importing torchvision).
AUGMENTATION_NAMES = ("photo", "glyph")
__all__ = ["MIDRE_ERASE", "RECIPE_LR", "SCHEDULES", "TRAINED_CHECKPOINT_LR", "TrainingRecipe", "default_lr"]
RECIPE_LR = 1e-3  # the paper's (fine-tuning from ImageNet weights, or training a new head)
TRAINED_CHECKPOINT_LR = 1e-4  # our default for a model already trained on the private data


def default_lr(model_is_trained: bool, reset_head: bool = False) -> float:
    """The recipe's 1e-3 for random or re-initialised heads, 1e-4 for an already-trained model."""
    return RECIPE_LR if (reset_head or not model_is_trained) else TRAINED_CHECKPOINT_LR


@dataclass
class TrainingRecipe:
    """Everything that defines a training run (the resolved config recorded in the model file)."""

    schedule: str = "tts"
    epochs: int = 10  # N: stage-2 epochs for TTS, all epochs for finetune
    stage1_epochs: int = 5  # M: TTS stage-1 epochs with full skips (the paper's 5)
    lr: float = RECIPE_LR
    betas: tuple[float, float] = (0.9, 0.999)
    milestones: tuple[float, ...] = (0.75, 0.9)  # fractions of all epochs
    gamma: float = 0.1
    batch_size: int = 128
    seed: int = 0
    bido: BiDOConfig | None = None
    label_smoothing: LabelSmoothing | None = None  # schedule resolved to whole epochs on creation
    erase: tuple[float, float, float] | None = None  # (p, min_area, max_area)
    freeze_stages: int = 0
    augmentation: str = "photo"  # mishield.data.AUGMENTATIONS: "photo" (the paper's), "glyph" (characters)
    noise: float = 0.0  # std of Gaussian pixel noise on training images (evaluation models: mishield.data.GaussianNoise)

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise UsageError(f"--schedule must be one of {', '.join(SCHEDULES)}, not {self.schedule!r}.")
        if self.epochs < 0 or self.stage1_epochs < 0:
            raise UsageError("--epochs and --stage1-epochs must be 0 or more.")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UsageError(f"--lr must be a positive number, got {self.lr}.")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}.")
        if isinstance(self.label_smoothing, (int, float)) and not isinstance(self.label_smoothing, bool):
            self.label_smoothing = LabelSmoothing(float(self.label_smoothing))  # a bare alpha: default schedule
        if self.label_smoothing is not None:
            if not isinstance(self.label_smoothing, LabelSmoothing):
                raise UsageError(f"`label_smoothing` must be a LabelSmoothing or its alpha, got {self.label_smoothing!r}.")
            self.label_smoothing = self.label_smoothing.resolved(self.total_epochs)
        if self.erase is not None:
            self.erase = check_erase(self.erase)
        if not (isinstance(self.noise, (int, float)) and math.isfinite(self.noise) and 0.0 <= self.noise <= 1.0):
            raise UsageError(f"`noise` is a standard deviation in [0, 1] pixel units (0: off), got {self.noise!r}.")
        if self.augmentation not in AUGMENTATION_NAMES:
            raise UsageError(f"`augmentation` must be one of {', '.join(AUGMENTATION_NAMES)}, got {self.augmentation!r}.")
        if isinstance(self.freeze_stages, bool) or not isinstance(self.freeze_stages, int) or self.freeze_stages < 0:
            raise UsageError(
                f"`freeze_stages` must be a whole number of stages, 0 (nothing frozen) or more, got {self.freeze_stages!r}."
            )

    @property
    def stages(self) -> list[tuple[str, int, int]]:
        """(stage name, first global epoch, end global epoch) in order."""
        if self.schedule == "tts":
            m = self.stage1_epochs
            return [("stage1", 0, m), ("stage2", m, m + self.epochs)]
        return [("finetune", 0, self.epochs)]

    @property
    def total_epochs(self) -> int:
        return self.stages[-1][2]

    def milestone_epochs(self) -> list[int]:
        total = self.total_epochs
        return sorted({max(1, round(f * total)) for f in self.milestones})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"], d["milestones"] = list(self.betas), list(self.milestones)
        d["bido"] = self.bido.to_dict() if self.bido else None
        for key in ("label_smoothing", "erase", "freeze_stages", "augmentation", "noise"):
            d.pop(key)  # recorded only when set, so a recipe without them records what it always did
        if self.label_smoothing is not None:
            d["label_smoothing"] = self.label_smoothing.to_dict()
        if self.erase is not None:
            d["erase"] = list(self.erase)
        if self.freeze_stages:
            d["freeze_stages"] = self.freeze_stages
        if self.augmentation != "photo":
            d["augmentation"] = self.augmentation
        if self.noise:
            d["noise"] = self.noise
        return d
