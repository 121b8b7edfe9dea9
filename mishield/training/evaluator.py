"""Training the evaluation model: the independent classifier that judges an audit's reconstructions.

PPA's protocol trains it on the same private data with a *different* architecture (default:
mishield's skip-free CNN), so a reconstruction counts only if another network recognises the
class in it (docs/audit.md, "Evaluation model"). The judge itself is `mishield.audit.evaluator`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mishield.configs import resolve_config
from mishield.errors import BadInputError
from mishield.progress import EpochCallback, ProgressCallback

DEFAULT_EVAL_ARCH = "mishield.models.plaincnn:plain_cnn"
# Gaussian pixel noise on the training images: perturbations made against the target carried over to
# the evaluator 5-8 points less often, for 1-5 points of clean accuracy (docs/audit.md, "Evaluation models").
DEFAULT_EVAL_NOISE = 0.25


@dataclass(frozen=True)
class EvalModelConfig:
    """How to train an evaluation model: `arch` (default mishield's skip-free CNN, which differs
    from the audited ResNets), `input_size` (default: the prior's resolution, see train_eval_model),
    the recipe (`epochs`, `lr`, `batch_size`, `seed`, `augmentation`: "photo" or "glyph" for drawn
    characters, `mishield.data.AUGMENTATIONS`), `noise` (std of the Gaussian pixel noise added to
    training images, 0 for none; `mishield.data.GaussianNoise`), `val_fraction` (a seeded hold-out
    where the data has no val/), `device`, `workers`, `resume` and `overwrite`."""

    arch: str = DEFAULT_EVAL_ARCH
    input_size: int | None = None
    epochs: int = 20
    lr: float = 1e-3
    batch_size: int = 128
    val_fraction: float | None = None
    device: torch.device | str = "cpu"
    seed: int = 0
    overwrite: bool = False
    resume: bool = False
    workers: int | None = None
    noise: float = DEFAULT_EVAL_NOISE
    augmentation: str = "photo"


def train_eval_model(
    data_dir: str | Path,
    out: str | Path,
    *,
    config: EvalModelConfig | None = None,
    prior: str | Path | None = None,
    progress: ProgressCallback | None = None,
    on_epoch: EpochCallback | None = None,
    **keywords,
) -> dict:
    """Train an evaluation model on the private data and save it as a self-describing mishield file.

    `config` (`EvalModelConfig`) says how; the former keyword form (`arch=`, `epochs=`, ...) is
    deprecated. Trained by `mishield.training.fit`, so it shares the other trainers' guarantees: the state
    beside `out` (`<out>.train-state`) after every epoch, `config.resume` to continue an
    interrupted run, a refusal of a state left by another run. `input_size` defaults to the
    attack's resolution: that of `prior` (a mishield prior file) when given, else the smallest
    prior resolution holding the images' native size (`mishield.data.default_resolution`: 28 px
    Fashion-MNIST -> 32), the same rule `prior train` follows. A folder without val/ is split as
    every command splits it (`evaluator_split`: a seeded 10 % held out unless `val_fraction` says
    otherwise), so the accuracy is always measured on images the model did not see. The file records
    the class names, the held-out accuracy, the split (`training.split`) and a fingerprint of the
    training images (`mishield.data.data_fingerprint`), which `mishield audit` checks
    (`mishield.audit.trust`). `out` and its state are checked against the inputs and locked for the
    run (`mishield.fileio.claim_output`). Returns a summary (arch, classes, natural accuracy on the
    held-out split and its size, input size, fingerprint, split, output path).
    """
    from mishield.fileio import claim_output
    from mishield.training.state import refuse_stale_state, state_path_for

    c = resolve_config("train_eval_model", config, keywords, EvalModelConfig)
    out = Path(out)
    state_path = state_path_for(out)
    with claim_output(out, c.overwrite, (data_dir, prior), (state_path,)):
        refuse_stale_state(state_path, c.resume, c.overwrite)
        splits, split = evaluator_split(data_dir, c.val_fraction, c.seed)
        return _train(data_dir, splits, split, c, out, prior, progress, on_epoch)


def evaluator_split(data_dir: str | Path, val_fraction: float | None, seed: int):
    """The private images an evaluation model trains on and the ones held out to measure it, and the
    record of the split its file keeps (`training.split`).

    A folder without val/ gets the seeded hold-out every command draws from it (10 % by default,
    `mishield.data.resolve_val_fraction`), so `mishield audit` with the same seed holds out the same
    images; the record (fraction, seed and the folder's signature) lets the audit redraw it for
    another seed and measure the evaluator only on images it did not see (`mishield.audit.trust`).
    """
    from mishield.data import (
        has_validation,
        hold_out,
        load_image_folders,
        resolve_val_fraction,
    )
    from mishield.training.state import data_signature

    splits = load_image_folders(data_dir, val_fraction=val_fraction, seed=seed)  # refuses a bad folder first
    if splits.num_classes < 2:
        raise BadInputError(
            f"{data_dir} has {splits.num_classes} class folder(s); an evaluation model needs at least 2 classes to tell apart."
        )
    if val_fraction is None and not has_validation(data_dir):
        splits = hold_out(splits, resolve_val_fraction(data_dir), seed)
    if splits.held_out is None:  # a val/ folder: the split is the folders themselves
        return splits, {"val_folder": True, "val_images": len(splits.val)}
    every = sorted(splits.train + splits.val)  # the order load_image_folders scans them in
    return splits, {**splits.held_out, "val_images": len(splits.val), "images": len(every),
                    "signature": data_signature(every)}


def _train(data_dir, splits, split: dict, c: EvalModelConfig, out: Path, prior, progress, on_epoch) -> dict:
    from mishield.data import data_fingerprint, default_resolution
    from mishield.models import build_architecture, default_preprocessing, save_model
    from mishield.training import RunOptions, TrainingRecipe, evaluate_accuracy, fit
    from mishield.training.state import state_path_for

    arch, input_size, epochs, lr, batch_size, seed = c.arch or DEFAULT_EVAL_ARCH, c.input_size, c.epochs, c.lr, c.batch_size, c.seed
    if input_size is None:
        input_size = prior_resolution(prior) if prior is not None else default_resolution(splits.train)
    fingerprint, _ = data_fingerprint(splits.train, splits.classes)
    torch.manual_seed(seed)
    model = build_architecture(arch, splits.num_classes)
    preprocessing = default_preprocessing(model, arch).with_input_size(input_size)
    recipe = TrainingRecipe(schedule="finetune", epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, noise=c.noise,
                            augmentation=c.augmentation)
    state_path = state_path_for(out)
    fit(model, splits, preprocessing, recipe, options=RunOptions(device=c.device, workers=c.workers, state_path=state_path,
                                                                 resume=c.resume), progress=progress, on_epoch=on_epoch)
    model = model.eval().cpu()
    accuracy = (
        evaluate_accuracy(model, splits.val, preprocessing, device=c.device, batch_size=batch_size) if splits.val else None
    )
    training = {"data": str(data_dir), "epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed, "role": "evaluation",
                "data_fingerprint": fingerprint, "split": split, "noise": c.noise,
                **({"augmentation": c.augmentation} if c.augmentation != "photo" else {})}
    metrics = {"natural_acc": accuracy, "val_images": len(splits.val)}
    save_model(
        out,
        model,
        arch=arch,
        num_classes=splits.num_classes,
        surgery=None,
        preprocessing=preprocessing,
        extra={"training": training, "metrics": metrics, "classes": splits.classes},
        overwrite=c.overwrite,
    )
    state_path.unlink(missing_ok=True)  # the finished model supersedes the resumable state
    return {"out": str(out), "arch": arch, "classes": splits.classes, "natural_acc": accuracy, "val_images": len(splits.val),
            "epochs": epochs, "input_size": input_size, "data_fingerprint": fingerprint, "split": split}


def prior_resolution(prior: str | Path) -> int:
    """The output resolution recorded in a mishield prior file (no weights are read)."""
    from mishield.models.dcgan import read_prior_meta

    return int(read_prior_meta(Path(prior))["config"]["resolution"])
