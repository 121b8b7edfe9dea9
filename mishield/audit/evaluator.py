"""The evaluation model: an independent classifier that judges the reconstructions.

PPA's protocol trains it on the same private data with a *different* architecture, so a
reconstruction counts only if it shows features of the class that another network recognises,
not the target's own adversarial shortcuts. Its penultimate features also give the KNN distance.
"""

from __future__ import annotations

import torch
from torch import nn

from mishield.attack.engine import chunks
from mishield.attack.inputs import ModelInput
from mishield.errors import BadInputError
from mishield.models import find_classifier
from mishield.preprocessing import Preprocessing
from mishield.progress import ProgressCallback
from mishield.runtime import Runtime, autocast


class Evaluator:
    """Logits and penultimate features (the classifier layer's input) of images in [-1, 1].

    `output_features=True` reads a feature extractor instead of a classifier: its output is the
    features (and the "logits"), e.g. the prior's discriminator (`mishield.audit.feature_spaces`).
    """

    def __init__(self, model: nn.Module, preprocessing: Preprocessing, runtime: Runtime, batch_size: int = 256,
                 output_features: bool = False):  # fmt: skip
        self.model = model.eval().requires_grad_(False).to(runtime.device)
        self.preprocessing, self.runtime, self.batch_size = preprocessing, runtime, batch_size
        self.model_input = ModelInput(preprocessing, runtime.device)
        self._features: torch.Tensor | None = None
        self._read: tuple[tuple, tuple] | None = None  # the last `read`: (key, answer)
        found = None if output_features else find_classifier(self.model)
        layer = found[1] if found else None
        self.feature_source = "penultimate" if layer is not None else ("output" if output_features else "logits")
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

    def read(self, items: list, image_shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Private `(path, label)` items degraded to `image_shape` (the prior's output, as `dataset` does)
        -> (logits, features, labels). The last answer is kept: the trust check and the audit's
        feature spaces both read the validation images, and the second read is then free."""
        from mishield.audit.trust import degraded_batches

        key = (tuple(str(p) for p, _ in items), tuple(int(v) for v in image_shape))
        if self._read is not None and self._read[0] == key:
            return self._read[1]
        logits, feats, labels = [], [], []
        for x, y in degraded_batches(items, image_shape, self.batch_size):
            lo, fe = self.images(x)
            logits.append(lo)
            feats.append(fe)
            labels.append(y)
        answer = (torch.cat(logits), torch.cat(feats), torch.cat(labels)) if labels else (torch.empty(0, 0), torch.empty(0, 0), torch.empty(0, dtype=torch.long))
        self._read = (key, answer)
        return answer

    def dataset(self, items: list, progress: ProgressCallback | None = None,
                image_shape: tuple[int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Private `(path, label)` items -> (features, labels).

        With `image_shape` (the prior's output) the images are first degraded to that resolution
        and then resized as reconstructions are (`mishield.audit.trust.degraded_batches`), so the
        KNN distance compares like with like; without, they are read the way the model was trained.
        """
        from torch.utils.data import DataLoader

        from mishield.audit.trust import degraded_batches
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
