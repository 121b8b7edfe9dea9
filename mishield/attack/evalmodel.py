"""The evaluation model: an independent classifier that judges the reconstructions.

PPA's protocol trains it on the same private data with a *different* architecture, so a
reconstruction counts only if it shows features of the class that another network recognises,
not the target's own adversarial shortcuts. Its penultimate features also give the KNN distance.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mishield.attack.inputs import ModelInput
from mishield.attack.ppa import chunks
from mishield.errors import BadInputError
from mishield.models import find_classifier
from mishield.preprocessing import Preprocessing
from mishield.progress import EpochCallback, ProgressCallback
from mishield.runtime import Runtime, autocast

DEFAULT_EVAL_ARCH = "mishield.models.plaincnn:plain_cnn"


class Evaluator:
    """Logits and penultimate features (the classifier layer's input) of images in [-1, 1]."""

    def __init__(self, model: nn.Module, preprocessing: Preprocessing, runtime: Runtime, batch_size: int = 256):
        self.model = model.eval().requires_grad_(False).to(runtime.device)
        self.preprocessing, self.runtime, self.batch_size = preprocessing, runtime, batch_size
        self.model_input = ModelInput(preprocessing, runtime.device)
        self._features: torch.Tensor | None = None
        found = find_classifier(self.model)
        layer = found[1] if found else None
        self.feature_source = "penultimate" if layer is not None else "logits"
        if layer is not None:
            layer.register_forward_pre_hook(self._keep_features)

    def _keep_features(self, module: nn.Module, inputs: tuple) -> None:
        self._features = inputs[0].flatten(1)

    @torch.no_grad()
    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._features = None
        with autocast(self.runtime):
            logits = self.model(x)
        features = self._features if self._features is not None else logits
        return logits.float().cpu(), features.float().cpu()

    def images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images (N, C, H, W) as the prior produced them -> (logits, features), on the CPU."""
        logits, feats = [], []
        for part in chunks(images.shape[0], self.batch_size):
            x = images[part].to(self.runtime.device).float() / 127.5 - 1.0
            lo, fe = self._forward(self.model_input(x))
            logits.append(lo)
            feats.append(fe)
        return torch.cat(logits), torch.cat(feats)

    def dataset(self, items: list, progress: ProgressCallback | None = None,
                image_shape: tuple[int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Private `(path, label)` items -> (features, labels).

        With `image_shape` (the prior's output) the images are first degraded to that resolution
        and then resized as reconstructions are (`mishield.attack.trust.degraded_batches`), so the
        KNN distance compares like with like; without, they are read the way the model was trained.
        """
        from torch.utils.data import DataLoader

        from mishield.attack.trust import degraded_batches
        from mishield.data import ImageDataset, eval_transform

        if image_shape is not None:
            batches = ((self.images(x)[1], y) for x, y in degraded_batches(items, image_shape, self.batch_size))
        else:
            dataset = ImageDataset(items, eval_transform(self.preprocessing), channels=self.preprocessing.input_size[0])
            loader = DataLoader(dataset, batch_size=self.batch_size, shuffle=False)
            batches = ((self._forward(x.to(self.runtime.device))[1], y) for x, y in loader)
        feats, labels = [], []
        for f, y in batches:
            feats.append(f)
            labels.append(y)
            if progress is not None:
                progress("private features", sum(len(t) for t in labels), len(items))
        if not feats:
            return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
        return torch.cat(feats), torch.cat(labels)


def check_hookable(evaluation) -> None:
    """The evaluator reads the penultimate features through a forward hook and freezes the weights;
    TorchScript and torch.export programs allow neither, so they are refused with a sentence."""
    kind = evaluation.info.get("kind")
    if kind in ("torchscript", "exported"):
        what = "a TorchScript archive" if kind == "torchscript" else "a torch.export program"
        raise BadInputError(
            f"the evaluation model {evaluation.name} is {what}, which the audit cannot read features from; "
            "pass the evaluation model as a state dict or a mishield file (mishield train-eval)."
        )


def check_compatible(eval_classes: int | None, target_classes: int, eval_name: str, target_name: str) -> None:
    if eval_classes is not None and eval_classes != target_classes:
        raise BadInputError(
            f"the evaluation model {eval_name} has {eval_classes} classes but the target {target_name} has {target_classes}; "
            "train the evaluation model on the same private classes (mishield train-eval)."
        )


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
    which `mishield audit` checks (`mishield.attack.trust`). Returns a summary (arch, classes,
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
    from mishield.attack.generators import read_prior_meta

    return int(read_prior_meta(Path(prior))["config"]["resolution"])
