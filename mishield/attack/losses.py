"""The identity losses the attack can optimise, by name (`AttackConfig.loss`; docs/audit.md, "The adaptive attack").

Every loss maps a batch of logits (N, K) and target labels (N,) to per-sample float32 losses (N,)
that fall as the image looks more like its label to the model; the engine sums them over the
batch. A loss that also reads the model's penultimate features says so (`needs_features`); the
engine then taps them with `PenultimateTap` and hands it per-class prototypes (`class_prototypes`).

* `poincare` — PPA's Poincaré distance (Struppek et al., ICML 2022; `mishield.attack.poincare`).
* `logit` — LOMMA's logit loss (Nguyen et al., CVPR 2023, "Re-thinking Model Inversion Attacks
  Against Deep Neural Networks"): `-z_y + lambda * mean_d (phi_d(x) - p_{y,d})^2`.
* `margin` — Carlini-Wagner's margin: `max_{j != y} z_j - z_y`, optionally clamped at `-kappa`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from mishield.attack.poincare import poincare_loss
from mishield.errors import BadInputError
from mishield.models.introspect import find_classifier

# LOMMA's lambda: the default coefficient of the feature term in the authors' released attack
# code (`lam=0.1`), which also averages the squared distance over the feature dimensions; so does
# `logit_loss`, which keeps one lambda meaningful for a 64-wide and a 2048-wide penultimate layer
# (an unnormalised sum would grow with the width and swamp the logit term of a wide model).
LOGIT_FEATURE_WEIGHT = 0.1


def logit_loss(logits: torch.Tensor, labels: torch.Tensor, features: torch.Tensor | None = None,
               prototypes: torch.Tensor | None = None, weight: float = LOGIT_FEATURE_WEIGHT) -> torch.Tensor:
    """LOMMA's logit loss per sample: `-z_y + weight * mean_d (features - prototypes[y])^2`.

    Maximising the raw logit, unlike cross-entropy, keeps rewarding the class itself rather than
    the gap to the other classes; the feature term keeps the image's penultimate features near
    those of natural images of the class, so the logit cannot be bought with an out-of-distribution
    activation. `prototypes` is a (K, D) table indexed by label; `features` (N, D). Without
    features or prototypes, or at `weight` 0, the loss is `-z_y` alone.
    """
    loss = -logits.float().gather(1, labels[:, None]).squeeze(1)
    if features is None or prototypes is None or weight == 0:
        return loss
    diff = features.float().flatten(1) - prototypes.float()[labels]
    return loss + weight * (diff * diff).mean(dim=1)


def margin_loss(logits: torch.Tensor, labels: torch.Tensor, kappa: float | None = None) -> torch.Tensor:
    """Carlini-Wagner's margin per sample: the best other logit minus the label's, `>= -kappa`.

    Zero where the label ties the strongest other class, negative once it wins. With `kappa` the
    loss stops at `-kappa` (C&W's confidence): no gradient once the label leads by kappa. The
    registry's `margin` is unclamped: the audit wants the strongest reconstruction, and final
    selection ranks by a confidence that keeps rising with the margin.
    """
    logits = logits.float()
    label_logit = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))  # scatter: no host-side label check
    loss = others.amax(dim=1) - label_logit
    return loss if kappa is None else loss.clamp_min(-kappa)


@dataclass(frozen=True)
class Loss:
    """A named identity loss: `compute(logits, labels, features, prototypes, weight)` -> (N,) float32."""

    name: str
    compute: Callable[..., torch.Tensor]
    needs_features: bool = False
    default_weight: float | None = None  # the feature term's weight; None: the loss has no feature term

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, features: torch.Tensor | None = None,
                 prototypes: torch.Tensor | None = None, weight: float | None = None) -> torch.Tensor:
        if not self.needs_features:
            return self.compute(logits, labels)
        return self.compute(logits, labels, features, prototypes, self.default_weight if weight is None else weight)


LOSSES: dict[str, Loss] = {
    "poincare": Loss("poincare", poincare_loss),
    "logit": Loss("logit", logit_loss, needs_features=True, default_weight=LOGIT_FEATURE_WEIGHT),
    "margin": Loss("margin", margin_loss),
}


class PenultimateTap:
    """A model's penultimate features (the input of its classifier layer), caught by a forward pre-hook.

    `tap(model, x)` returns `(logits, features)`. The hook keeps a tensor only during that call and
    drops it right after, so no autograd graph outlives the step, and a tap left on a model that
    is later run elsewhere (another attack on the same target) holds nothing. The layer is found
    as the evaluator finds it (`mishield.models.find_classifier`).
    """

    def __init__(self, model: nn.Module, name: str = "the model"):
        found = find_classifier(model)
        if found is None:
            raise BadInputError(
                f"{name} has no Linear or Conv2d classifier layer whose input could serve as penultimate features; "
                "the `logit` loss needs them: use the `poincare` or `margin` loss."
            )
        self.layer_name = found[0]
        self.features: torch.Tensor | None = None
        self.armed = False
        self.handle = found[1].register_forward_pre_hook(self._keep)

    def _keep(self, module: nn.Module, inputs: tuple) -> None:
        if self.armed:
            self.features = inputs[0]

    def __call__(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.features, self.armed = None, True
        try:
            logits = model(x)
        finally:
            self.armed = False
        features, self.features = self.features, None
        if features is None:
            raise BadInputError(f"the classifier layer {self.layer_name} was not called in the forward pass; the `logit` loss cannot read features.")
        return logits, features.flatten(1)

    def remove(self) -> None:
        self.handle.remove()


def class_prototypes(features: torch.Tensor, classes: list[int], per_class: int, num_classes: int) -> torch.Tensor:
    """A (num_classes, D) float32 table: row c is the mean of class c's `per_class` rows of `features`.

    `features` (len(classes) * per_class, D) is class-major, as the attack's candidates are. Rows
    of classes not attacked stay zero (never read: labels only name attacked classes). Each class
    is averaged over its own rows alone, so a class's prototype does not depend on which other
    classes share the run (sharded runs reproduce single-process ones).
    """
    means = features.float().view(len(classes), per_class, -1).mean(dim=1)
    table = means.new_zeros(num_classes, means.shape[1])
    table[torch.tensor(classes, device=means.device)] = means
    return table
