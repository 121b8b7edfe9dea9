"""Training the evaluation model: the independent classifier that judges an audit's reconstructions.

PPA's protocol trains it on the same private data with a *different* architecture (default:
mishield's skip-free CNN), so a reconstruction counts only if another network recognises the
class in it (docs/audit.md, "Evaluation model"). The judge itself is `mishield.audit.evaluator`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mishield.errors import BadInputError
from mishield.progress import EpochCallback, ProgressCallback

DEFAULT_EVAL_ARCH = "mishield.models.plaincnn:plain_cnn"


def train_eval_model(
    data_dir: str | Path,
    out: str | Path,
    *,
    arch: str | None = None,
    input_size: int | None = None,
    prior: str | Path | None = None,
    epochs: int = 20,
    lr: float = 1e-3,
    batch_size: int = 128,
    val_fraction: float | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    overwrite: bool = False,
    resume: bool = False,
    workers: int | None = None,
    progress: ProgressCallback | None = None,
    on_epoch: EpochCallback | None = None,
) -> dict:
    """Train an evaluation model on the private data and save it as a self-describing mishield file.

    Trained by `mishield.training.fit`, so it shares the other trainers' guarantees: the state
    beside `out` (`<out>.train-state`) after every epoch, `resume=True` to continue an
    interrupted run, a refusal of a state left by another run. `input_size` defaults to the
    attack's resolution: that of `prior` (a mishield prior file) when given, else the smallest
    prior resolution holding the images' native size (`mishield.data.default_resolution`: 28 px
    Fashion-MNIST -> 32), the same rule `prior train` follows. The file records the class names,
    the held-out accuracy and a fingerprint of the training images (`mishield.data.data_fingerprint`),
    which `mishield audit` checks (`mishield.audit.trust`). Returns a summary (arch, classes,
    natural accuracy on the held-out split, input size, fingerprint, output path).
    """
    from mishield.data import data_fingerprint, default_resolution, load_image_folders
    from mishield.fileio import check_writable
    from mishield.models import build_architecture, default_preprocessing, save_model
    from mishield.training import evaluate_accuracy, fit
    from mishield.training.state import refuse_stale_state, state_path_for

    arch = arch or DEFAULT_EVAL_ARCH
    out = Path(out)
    check_writable(out, overwrite)
    state_path = state_path_for(out)
    refuse_stale_state(state_path, resume, overwrite)
    splits = load_image_folders(data_dir, val_fraction=val_fraction, seed=seed)
    if splits.num_classes < 2:
        raise BadInputError(
            f"{data_dir} has {splits.num_classes} class folder(s); an evaluation model needs at least 2 classes to tell apart."
        )
    if input_size is None:
        input_size = prior_resolution(prior) if prior is not None else default_resolution(splits.train)
    fingerprint, _ = data_fingerprint(splits.train, splits.classes)
    torch.manual_seed(seed)
    model = build_architecture(arch, splits.num_classes)
    preprocessing = default_preprocessing(model, arch).with_input_size(input_size)
    fit(model, splits, preprocessing, epochs=epochs, lr=lr, batch_size=batch_size, device=device, seed=seed,
        workers=workers, state_path=state_path, resume=resume, progress=progress, on_epoch=on_epoch)
    model = model.eval().cpu()
    accuracy = (
        evaluate_accuracy(model, splits.val, preprocessing, device=device, batch_size=batch_size) if splits.val else None
    )
    training = {"data": str(data_dir), "epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed, "role": "evaluation",
                "data_fingerprint": fingerprint}
    metrics = {"natural_acc": accuracy, "val_images": len(splits.val)}
    save_model(
        out,
        model,
        arch=arch,
        num_classes=splits.num_classes,
        surgery=None,
        preprocessing=preprocessing,
        extra={"training": training, "metrics": metrics, "classes": splits.classes},
        overwrite=overwrite,
    )
    state_path.unlink(missing_ok=True)  # the finished model supersedes the resumable state
    return {"out": str(out), "arch": arch, "classes": splits.classes, "natural_acc": accuracy, "epochs": epochs,
            "input_size": input_size, "data_fingerprint": fingerprint}


def prior_resolution(prior: str | Path) -> int:
    """The output resolution recorded in a mishield prior file (no weights are read)."""
    from mishield.models.dcgan import read_prior_meta

    return int(read_prior_meta(Path(prior))["config"]["resolution"])
