"""Gradient-masking "defences" for the tests: same top-1 labels as the model on real images, useless gradients.

Each wrapper takes a trained classifier (normalised input -> logits) and returns a module whose
predictions on real images equal the model's, while a gradient attacker following it gets
nothing (issue 20's measured wrappers, rebuilt here):

* `DetachedInput`: the input is cut from the graph. `connected=True` (the default) keeps a graph
  with an exactly zero gradient (`x.detach() + 0 * x`), so a gradient attack runs and does not
  move; `connected=False` is a bare `.detach()`, on which autograd itself refuses to backpropagate.
* `QuantisedInput`: the input is rounded to the 8-bit grid of the model's pixel space
  ([0, 1] before mean/std), the straight rounding whose gradient is zero almost everywhere.
  Real images loaded from 8-bit files are already on that grid, so rounding gives them back.
* `Temperature`: logits x `t` (x1e3 saturates the softmax, x1e-3 flattens it); the argmax is the same.
* `GeneratedInputDetector`: the model's logits for natural-looking inputs and confident junk for
  generated-looking ones. The test is *not* the exact-black pixel of the issue's example (that
  needs a dataset with black backgrounds and is fooled by any generator that saturates): an
  image is natural when most of its unsaturated pixels lie on the 8-bit grid, which every image
  that came from an 8-bit file through the data pipeline does (PIL resizes in 8 bits), and a
  generator's continuous output does not (about 2 % of values fall within the tolerance by
  chance). Saturated pixels (exactly 0 or 1, where tanh or a clamp ends) are left out of the
  count because a generator hits them exactly too. An image without unsaturated pixels counts as
  natural (there is nothing to tell it by). The junk is a confident one-hot of a fixed random
  projection of the input: it carries no information about the model.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from mishield.attack.priors import Prior
from mishield.preprocessing import Preprocessing

GRID_TOLERANCE = 0.01  # in units of one 8-bit step: float round-off of a real image is ~1e-4 of a step
NATURAL_ON_GRID = 0.5  # fraction of unsaturated pixels on the grid from which an image is natural
JUNK_LOGIT = 20.0


class _Normalised:
    """Maps a model's normalised input back to its [0, 1] pixel space and forth."""

    def __init__(self, pre: Preprocessing):
        channels = pre.input_size[0]
        mean, std = list(pre.mean), list(pre.std)
        if len(mean) != channels:
            mean, std = [sum(mean) / len(mean)] * channels, [sum(std) / len(std)] * channels
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)

    def pixels(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std.to(x) + self.mean.to(x)

    def normalise(self, p: torch.Tensor) -> torch.Tensor:
        return (p - self.mean.to(p)) / self.std.to(p)


class DetachedInput(nn.Module):
    def __init__(self, model: nn.Module, connected: bool = True):
        super().__init__()
        self.model, self.connected = model, connected

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cut = x.detach()
        return self.model(cut + 0 * x if self.connected else cut)


class QuantisedInput(nn.Module):
    def __init__(self, model: nn.Module, pre: Preprocessing):
        super().__init__()
        self.model, self.space = model, _Normalised(pre)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.space.pixels(x)
        return self.model(self.space.normalise(torch.round(p * 255.0) / 255.0))


class Temperature(nn.Module):
    def __init__(self, model: nn.Module, t: float):
        super().__init__()
        self.model, self.t = model, t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) * self.t


def natural_looking(x: torch.Tensor, space: _Normalised) -> torch.Tensor:
    """(N,) True where most unsaturated pixels of the normalised input lie on the 8-bit grid."""
    steps = space.pixels(x.float()).flatten(1) * 255.0
    inner = (steps > 0.5) & (steps < 254.5)
    on_grid = ((steps - steps.round()).abs() <= GRID_TOLERANCE) & inner
    count = inner.sum(1)
    return (count == 0) | (on_grid.sum(1) >= NATURAL_ON_GRID * count)


class GeneratedInputDetector(nn.Module):
    def __init__(self, model: nn.Module, pre: Preprocessing, num_classes: int, seed: int = 0):
        super().__init__()
        self.model, self.space, self.num_classes = model, _Normalised(pre), num_classes
        features = int(torch.tensor(pre.input_size).prod())
        self.register_buffer("projection", torch.randn(features, num_classes, generator=torch.Generator().manual_seed(seed)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        junk_class = (x.flatten(1).float() @ self.projection).argmax(dim=1)
        junk = JUNK_LOGIT * nn.functional.one_hot(junk_class, self.num_classes).to(logits.dtype)
        natural = natural_looking(x, self.space)[:, None]
        return torch.where(natural, logits, junk)


def masked_wrappers(model: nn.Module, pre: Preprocessing, num_classes: int) -> dict[str, nn.Module]:
    """Every wrapper above around `model`, by name."""
    return {
        "detach": DetachedInput(model),
        "detach-hard": DetachedInput(model, connected=False),
        "quantise": QuantisedInput(model, pre),
        "temperature-1e3": Temperature(model, 1e3),
        "temperature-1e-3": Temperature(model, 1e-3),
        "detector": GeneratedInputDetector(model, pre, num_classes),
    }


# ---------------------------------------------------------------------------------------------
# The real target and class-disjoint prior the masking tests attack (tests/attack/test_blackbox.py,
# tests/attack/test_masking_diagnostics.py): a small CNN trained for 30 steps on the embedded
# Fashion-MNIST's classes 0-4, and a linear prior of the public classes 5-9.

FMNIST_PRE = Preprocessing((1, 28, 28), (0.5,), (0.5,))  # prior images in [-1, 1] are this model input as they are
PCA_DIM = 16


def fmnist_images(array) -> torch.Tensor:
    """uint8 (N, 28, 28) -> the model's normalised input under FMNIST_PRE (on the 8-bit grid)."""
    return torch.from_numpy(array).float()[:, None] / 127.5 - 1.0


def _train_cnn(seed: int) -> nn.Module:
    from attack_support import train_on_tensors

    from mishield.data import load_embedded_fashion_mnist

    fm = load_embedded_fashion_mnist()
    x, y = fmnist_images(fm.train_images), torch.from_numpy(fm.train_labels).long()
    private = y < 5
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 7 * 7, 5),
    )  # fmt: skip
    return train_on_tensors(model, x[private][::2], y[private][::2], epochs=2)  # 750 images: 30 steps


@functools.cache
def fmnist_target() -> nn.Module:
    """The attacked model (shared: deep-copy it before wrapping it into anything that changes it)."""
    return _train_cnn(0)


@functools.cache
def fmnist_other_target() -> nn.Module:
    """The same recipe from another seed: a legitimately different model, not a masked one."""
    return _train_cnn(1)


class PCAPrior(Prior):
    """z (16) -> mean + principal directions of the public classes scaled by their spread, clamped to [-1, 1]."""

    def __init__(self):
        from mishield.data import load_embedded_fashion_mnist

        fm = load_embedded_fashion_mnist()
        public = fmnist_images(fm.train_images)[torch.from_numpy(fm.train_labels) >= 5].flatten(1)
        self.mean = public.mean(0)
        _, s, v = torch.linalg.svd(public - self.mean, full_matrices=False)
        self.basis = v[:PCA_DIM] * (s[:PCA_DIM, None] / len(public) ** 0.5)
        super().__init__((1, 28, 28), (PCA_DIM,), {"source": "pca"})

    def generate(self, latents: torch.Tensor) -> torch.Tensor:
        return (self.mean + latents.float() @ self.basis).clamp(-1, 1).view(-1, 1, 28, 28)


@functools.cache
def pca_prior() -> PCAPrior:
    return PCAPrior()
