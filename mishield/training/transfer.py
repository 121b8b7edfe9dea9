"""TL-DMI's recipe itself (Ho et al., "Model Inversion Robustness: Can Transfer Learning Help?",
CVPR 2024): the early stages learn from public data only, the later ones from the private data.

    pre = pretrain_on_public(model, public, preprocessing, TrainingRecipe("finetune", epochs=20), private_classes=10)
    result = fit(pre.model, private, preprocessing, TrainingRecipe("finetune", epochs=10, freeze_stages=2))

1. `pretrain_on_public` trains the whole model on the public classes through a temporary head
   (`reset_head` to the public class count), then gives it a fresh head for the private classes.
2. Fine-tuning on the private data with `freeze_stages` = N (`fit`, or `run_schedule` with
   RoLSS / SSF surgery) keeps the stem and the first N stages as the public data left them,
   batch-norm statistics included; the later stages start from their public weights (TL-DMI
   fine-tunes, it does not re-initialise them) and the head learns from scratch.

`train_tl_dmi` runs both on the shared loop (`fit`), each resumable from its own state file.
The public data must not hold the private images; class names shared by both folders are warned
about (the same classes from other images are legitimate, the same images are not).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mishield.data import DataSplits
from mishield.errors import UsageError
from mishield.preprocessing import Preprocessing
from mishield.progress import EpochCallback, ProgressCallback
from mishield.training.loop import FitResult, RunOptions, fit, to_cpu_eval
from mishield.training.recipe import TrainingRecipe
from mishield.training.schedule import reset_head

_log = logging.getLogger("mishield.training")


@dataclass
class PublicPretraining:
    """The model after public pre-training, with its fresh private head, and how it went."""

    model: nn.Module  # on the CPU, in eval mode, head for the private classes (untrained)
    history: list[dict]
    public_classes: list[str]
    public_accuracy: float | None  # on `public.val`, with the temporary public head
    seconds: float

    def to_dict(self) -> dict:
        return {"public_classes": self.public_classes, "epochs": len(self.history),
                "public_accuracy": self.public_accuracy, "seconds": round(self.seconds, 2)}


def pretrain_on_public(
    model: nn.Module,
    public: DataSplits,
    preprocessing: Preprocessing,
    recipe: TrainingRecipe,
    *,
    private_classes: int,
    options: RunOptions | None = None,
    progress: ProgressCallback | None = None,
    on_epoch: EpochCallback | None = None,
) -> PublicPretraining:
    """Step 1 of TL-DMI: train all of `model` (in place) on `public` for `recipe.epochs`, then reset
    its head to `private_classes` outputs. The private head is seeded from `recipe.seed`, so a
    resumed run gets the same one."""
    if recipe.epochs < 1:
        raise UsageError(f"`epochs` of the public pre-training must be 1 or more, got {recipe.epochs!r}.")
    if isinstance(private_classes, bool) or not isinstance(private_classes, int) or private_classes < 2:
        raise UsageError(f"`private_classes` must be 2 or more, got {private_classes!r}.")
    reset_head(model, public.num_classes)
    result = fit(model, public, preprocessing, recipe, options=options, progress=progress, on_epoch=on_epoch)
    torch.manual_seed(recipe.seed)
    reset_head(result.model, private_classes)
    return PublicPretraining(to_cpu_eval(result.model), result.history, list(public.classes),
                             result.final.get("val_acc"), result.seconds)


@dataclass
class TLDMIResult:
    model: nn.Module  # trained on the private data, on the CPU, in eval mode
    pretraining: PublicPretraining
    fine_tuning: FitResult
    freeze_stages: int
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"method": "tl-dmi", "freeze_stages": self.freeze_stages, "public": self.pretraining.to_dict(),
                "private_epochs": len(self.fine_tuning.history), "final": self.fine_tuning.final,
                "seconds": round(self.seconds, 2)}


def _public_state(state_path: Path | None) -> Path | None:
    return None if state_path is None else Path(state_path).with_name(Path(state_path).name + ".public")


def train_tl_dmi(
    model: nn.Module,
    public: DataSplits,
    private: DataSplits,
    preprocessing: Preprocessing,
    recipe: TrainingRecipe,
    *,
    public_epochs: int,
    options: RunOptions | None = None,
    progress: ProgressCallback | None = None,
    on_epoch: EpochCallback | None = None,
) -> TLDMIResult:
    """TL-DMI end to end on the shared loop: public pre-training for `public_epochs` (without the
    recipe's defences), then `recipe` on the private data with the stem and the first
    `recipe.freeze_stages` stages frozen (stackable with label smoothing and erasing). With
    `options.state_path` each phase keeps its own resumable state (`STATE.public` for the first)."""
    freeze_stages = recipe.freeze_stages
    if isinstance(freeze_stages, bool) or not isinstance(freeze_stages, int) or freeze_stages < 1:
        raise UsageError(f"TL-DMI needs `freeze_stages` of 1 or more (the stages kept from public data), got {freeze_stages!r}.")
    shared = sorted(set(public.classes) & set(private.classes))
    if shared:
        _log.warning("the public and private data share class folders (%s); TL-DMI assumes the public "
                     "images are not private ones.", ", ".join(shared[:5]))
    options = options or RunOptions()
    t0 = time.perf_counter()
    public_recipe = TrainingRecipe(schedule="finetune", epochs=public_epochs, lr=recipe.lr, batch_size=recipe.batch_size,
                                   seed=recipe.seed, augmentation=recipe.augmentation)
    pre = pretrain_on_public(model, public, preprocessing, public_recipe, private_classes=private.num_classes,
                             options=dataclasses.replace(options, state_path=_public_state(options.state_path), log_path=None),
                             progress=progress, on_epoch=on_epoch)
    tuned = fit(pre.model, private, preprocessing, recipe, options=options, progress=progress, on_epoch=on_epoch)
    return TLDMIResult(tuned.model, pre, tuned, freeze_stages, time.perf_counter() - t0)
