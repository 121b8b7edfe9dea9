"""Gradient-masking diagnostics: does a model give an attacker who follows its gradients anything to follow?

A defence that only breaks input gradients (a detached or rounded input, logits scaled until
the softmax saturates, a detector that answers generated images with constants) lowers the
gradient attacks' accuracy without making the model any more private (issue 20; Athalye et al.,
ICML 2018, "Obfuscated Gradients Give a False Sense of Security"). Its traces are in the input
gradients themselves, measured against the first (undefended) model of the audit on the same
images:

* `input_gradients`: d CE(model(x), y) / dx per image, float32 (y: the true label of a real
  image, the model's own top-1 of a prior sample); a model whose output does not depend on its
  input gives zeros instead of an autograd error;
* `gradient_stats` (pure): median per-image L2 norm, fraction of exactly-zero entries, fraction of
  non-finite entries;
* `masking_signals` (pure): the one-sentence reasons a model's statistics on real and on prior
  images look masked next to the reference's, under `MaskingThresholds`.

The thresholds are deliberately coarse (orders of magnitude, half of all entries): the masking
wrappers they are built against move these statistics to 0 or by factors of 1e3, while a real
change of architecture or training moves them by small factors. They still have to be checked on
real RoLSS / SSF copies before a verdict reads them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GradientStats:
    """Input-gradient statistics of one model on one set of images."""

    n: int  # images
    median_norm: float  # median over images of the per-image L2 norm (non-finite entries left out)
    zero_fraction: float  # fraction of all gradient entries that are exactly 0
    nonfinite_fraction: float  # fraction of entries that are inf or nan

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MaskingThresholds:
    zero_excess: float = 0.5  # zero_fraction above the reference's by more than this
    norm_factor: float = 100.0  # median norm outside [reference / f, reference * f]
    asymmetry_factor: float = 100.0  # (prior / real norm ratio) against the reference's, beyond this factor


def input_gradients(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor | None = None, batch_size: int = 64) -> torch.Tensor:
    """d CE(model(x), y) / dx for each image of `inputs` (normalised model input), float32, on the inputs' device.

    `labels` None: each image's own top-1 class (what an attacker of a prior sample pushes on).
    Eval mode; the model's parameters are left as they were.
    """
    model.eval()
    out = torch.zeros(inputs.shape, dtype=torch.float32, device=inputs.device)
    for start in range(0, inputs.shape[0], batch_size):
        x = inputs[start : start + batch_size].detach().float().requires_grad_(True)
        with torch.enable_grad():
            logits = model(x).float()
            y = logits.argmax(1) if labels is None else labels[start : start + batch_size].to(logits.device)
            loss = F.cross_entropy(logits, y, reduction="sum")
            if loss.requires_grad:  # a bare .detach() inside the model leaves no graph: the gradient is 0
                (grad,) = torch.autograd.grad(loss, x, allow_unused=True)
                if grad is not None:
                    out[start : start + batch_size] = grad
    return out


def gradient_stats(grads: torch.Tensor) -> GradientStats:
    """`GradientStats` of per-image gradients (N, ...)."""
    flat = grads.detach().float().flatten(1)
    finite = torch.isfinite(flat)
    norms = torch.where(finite, flat, torch.zeros_like(flat)).norm(dim=1)
    return GradientStats(
        n=int(flat.shape[0]),
        median_norm=float(norms.median()) if flat.shape[0] else float("nan"),
        zero_fraction=float((flat == 0).float().mean()) if flat.numel() else float("nan"),
        nonfinite_fraction=float((~finite).float().mean()) if flat.numel() else float("nan"),
    )


def _ratio(value: float, reference: float) -> float | None:
    return value / reference if reference > 0 and math.isfinite(reference) and math.isfinite(value) else None


def masking_signals(model: dict[str, GradientStats], reference: dict[str, GradientStats],
                    thresholds: MaskingThresholds = MaskingThresholds()) -> list[str]:
    """Why `model`'s gradient statistics look masked next to `reference`'s, one sentence each (empty: nothing seen).

    Both map an image set's name ("real", "prior", ...) to its `GradientStats`; sets missing from
    either side are skipped. The reference is the audit's first model on the same images.
    """
    reasons = []
    for name, stats in model.items():
        ref = reference.get(name)
        if ref is None:
            continue
        if stats.nonfinite_fraction > 0:
            reasons.append(f"{stats.nonfinite_fraction:.0%} of the input-gradient entries on {name} images are not finite.")
        if stats.zero_fraction - ref.zero_fraction > thresholds.zero_excess:
            reasons.append(f"{stats.zero_fraction:.0%} of the input-gradient entries on {name} images are exactly zero "
                           f"(the first model: {ref.zero_fraction:.0%}).")  # fmt: skip
        ratio = _ratio(stats.median_norm, ref.median_norm)
        if ratio is not None and not 1 / thresholds.norm_factor <= ratio <= thresholds.norm_factor:
            reasons.append(f"the median input-gradient norm on {name} images is {ratio:.2g} times the first model's.")
    norms = [_positive_norm(stats, name) for stats in (model, reference) for name in ("real", "prior")]
    if None not in norms:
        real, prior, ref_real, ref_prior = norms
        asymmetry = (prior / real) / (ref_prior / ref_real)
        if not 1 / thresholds.asymmetry_factor <= asymmetry <= thresholds.asymmetry_factor:
            reasons.append(f"relative to real images, the input gradients on prior images are {asymmetry:.2g} times "
                           "as large as the first model's: the model treats generated inputs differently.")  # fmt: skip
    return reasons


def _positive_norm(stats: dict[str, GradientStats], name: str) -> float | None:
    found = stats.get(name)
    return found.median_norm if found is not None and math.isfinite(found.median_norm) and found.median_norm > 0 else None
