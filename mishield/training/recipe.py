"""The training recipe: schedule, epochs, optimiser and LR decay, batch size, seed, BiDO.

The recipe is the paper's (Adam, betas (0.9, 0.999), MultiStepLR at 75 % and 90 % of all epochs,
gamma 0.1, batch 128). Its lr 1e-3 is for fine-tuning from ImageNet weights; for a checkpoint
already trained on the private data we default to 1e-4 (`default_lr`), so the surgery's
perturbation is repaired without washing out what earlier training learned.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from mishield.errors import UsageError
from mishield.training.bido import BiDOConfig

SCHEDULES = ("tts", "finetune")
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

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise UsageError(f"--schedule must be one of {', '.join(SCHEDULES)}, not {self.schedule!r}.")
        if self.epochs < 0 or self.stage1_epochs < 0:
            raise UsageError("--epochs and --stage1-epochs must be 0 or more.")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UsageError(f"--lr must be a positive number, got {self.lr}.")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}.")

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
        return d
