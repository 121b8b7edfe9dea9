"""BiDO: bilateral dependency optimisation (Peng et al., KDD 2022), DESIGN.md §2.

    L = CE + sum_j [ lx * HSIC(X, Z_j) - ly * HSIC(Y, Z_j) ]

over hidden features Z_j (the stem output and each stage output): the model is pushed to forget
what its features say about the input X (which an inversion attack reconstructs) while keeping
what they say about the label Y.

Kernels: Gaussian with sigma = 5 normalised by the feature dimension,
`k(a, b) = exp(-||a - b||^2 / (2 sigma^2 dim))`, for X and Z_j; linear on one-hot labels for Y.

Estimator. The default is BiDO's *normalised* HSIC ("nhsic"): with right-centred kernels
K~ = K H (H = I - 11^T / m) and R = K~ (K~ + eps m I)^-1, nHSIC(X, Y) = sum(R_X * R_Y^T) =
tr(R_X R_Y). It is the estimator BiDO's own code trains with, and lx = 0.05 / ly = 0.5 were tuned
for its scale: it counts the kernel eigen-directions above the eps * m ridge that two samples
share, so it is O(1)..O(m) whatever the features' magnitude. Its known limit: when both kernels
have more such directions than the batch has samples (dim >> m, rich features) it saturates near
m - 1. The plain biased estimator tr(K H L H) / (m - 1)^2 ("biased") is offered too; with
sigma = 5 its Gaussian kernel entries all sit near 1, so its values are ~1e-4 and the default
weights would leave it almost without effect.

Everything runs on the tensors' device, in float32 (float64 for nHSIC's small m x m solves) with
autocast switched off inside, unlike the public toolbox, which silently moves the kernels to the
CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ESTIMATORS = ("nhsic", "biased")
NHSIC_EPS = 1e-5
SIGMA = 5.0


@dataclass(frozen=True)
class BiDOConfig:
    """The BiDO recipe. Defaults are the BiDO authors' (DESIGN.md §2)."""

    lx: float = 0.05
    ly: float = 0.5
    sigma: float = SIGMA
    estimator: str = "nhsic"

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"unknown HSIC estimator {self.estimator!r}; choose one of {ESTIMATORS}")

    def to_dict(self) -> dict:
        return {"lx": self.lx, "ly": self.ly, "sigma": self.sigma, "estimator": self.estimator}


# ---------------------------------------------------------------------------------------------
# Kernels and the estimator


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).float()


def gaussian_kernel(x: Tensor, sigma: float = SIGMA) -> Tensor:
    """`exp(-||a - b||^2 / (2 sigma^2 dim))` between the rows of `x` (any shape, batch first)."""
    with torch.autocast(x.device.type, enabled=False):
        x = _flat(x)
        sq = x.pow(2).sum(dim=1)
        # ||a||^2 + ||b||^2 - 2 a.b: one matmul instead of an (m, m, dim) difference tensor;
        # clamping removes the small negatives that cancellation leaves on the diagonal.
        dist = (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp_min(0.0)
        return torch.exp(-dist / (2.0 * sigma * sigma * x.shape[1]))


def linear_kernel(x: Tensor) -> Tensor:
    with torch.autocast(x.device.type, enabled=False):
        x = _flat(x)
        return x @ x.T


def label_kernel(labels: Tensor, num_classes: int) -> Tensor:
    """Linear kernel on one-hot labels: 1 where two samples share a class, else 0."""
    return linear_kernel(F.one_hot(labels.long(), num_classes))


def _right_centre(k: Tensor) -> Tensor:
    # K H = K - (K 1) 1^T / m: subtract each row's mean, without building H.
    return k - k.mean(dim=1, keepdim=True)


def hsic_biased(k_x: Tensor, k_y: Tensor) -> Tensor:
    """tr(K H L H) / (m - 1)^2 (Gretton et al., 2005)."""
    with torch.autocast(k_x.device.type, enabled=False):
        k_x, k_y = k_x.float(), k_y.float()
        m = k_x.shape[0]
        kc = _right_centre(k_x)  # K H
        lc = _right_centre(k_y)  # L H
        # tr(KH LH) = sum_ij (KH)_ij (LH)_ji
        return (kc * lc.T).sum() / float((m - 1) ** 2)


def _normalised_operator(k: Tensor, eps: float) -> Tensor:
    m = k.shape[0]
    kc = _right_centre(k)
    reg = kc + (eps * m) * torch.eye(m, device=k.device, dtype=k.dtype)
    # R = K~ (K~ + eps m I)^-1, i.e. solve R A = K~. solve_ex skips the error check that would
    # force a GPU->CPU sync every step; A is well conditioned because of the ridge term.
    r, _ = torch.linalg.solve_ex(reg, kc, left=False)
    return r


def hsic_normalized(k_x: Tensor, k_y: Tensor, eps: float = NHSIC_EPS) -> Tensor:
    """BiDO's normalised HSIC: sum(R_X * R_Y^T) with R = K H (K H + eps m I)^-1."""
    with torch.autocast(k_x.device.type, enabled=False):
        # float64 here: with sigma = 5 the centred Gaussian kernel has many eigenvalues near the
        # eps * m ridge, so the solve has a condition number ~ 1 / eps and float32 gets the
        # count of shared directions wrong by several percent (and not permutation-invariant).
        # The matrices are only (m, m), so this costs microseconds even on consumer GPUs.
        r_x = _normalised_operator(k_x.double(), eps)
        r_y = _normalised_operator(k_y.double(), eps)
        return (r_x * r_y.T).sum().float()


def hsic(k_x: Tensor, k_y: Tensor, estimator: str = "nhsic") -> Tensor:
    """HSIC between two samples given their (m, m) kernel matrices; see the module docstring."""
    if k_x.shape != k_y.shape or k_x.dim() != 2 or k_x.shape[0] != k_x.shape[1]:
        raise ValueError(f"hsic needs two (m, m) kernel matrices, got {tuple(k_x.shape)} and {tuple(k_y.shape)}")
    if estimator == "nhsic":
        return hsic_normalized(k_x, k_y)
    if estimator == "biased":
        return hsic_biased(k_x, k_y)
    raise ValueError(f"unknown HSIC estimator {estimator!r}; choose one of {ESTIMATORS}")


def bido_terms(
    features: Sequence[Tensor],
    inputs: Tensor,
    labels: Tensor,
    num_classes: int,
    *,
    sigma: float = SIGMA,
    estimator: str = "nhsic",
) -> tuple[list[Tensor], list[Tensor]]:
    """(HSIC(X, Z_j) for each j, HSIC(Y, Z_j) for each j)."""
    k_x = gaussian_kernel(inputs.detach(), sigma)
    k_y = label_kernel(labels, num_classes)
    hx, hy = [], []
    for z in features:
        k_z = gaussian_kernel(z, sigma)
        hx.append(hsic(k_x, k_z, estimator))
        hy.append(hsic(k_y, k_z, estimator))
    return hx, hy


def bido_loss(
    features: Sequence[Tensor],
    inputs: Tensor,
    labels: Tensor,
    num_classes: int,
    lx: float = 0.05,
    ly: float = 0.5,
    *,
    sigma: float = SIGMA,
    estimator: str = "nhsic",
) -> Tensor:
    """The BiDO regulariser `sum_j lx * HSIC(X, Z_j) - ly * HSIC(Y, Z_j)` (add it to the CE loss)."""
    hx, hy = bido_terms(features, inputs, labels, num_classes, sigma=sigma, estimator=estimator)
    return sum(lx * a - ly * b for a, b in zip(hx, hy))


# ---------------------------------------------------------------------------------------------
# Which hidden features: the stem and each stage output


def _declared_feature_modules(model: nn.Module) -> list[str] | None:
    info = getattr(model, "feature_info", None)
    if info is not None:  # timm: list of dicts (or a FeatureInfo) naming stem + stage modules
        try:
            names = [str(d["module"]) for d in info] if isinstance(info, (list, tuple)) else list(info.module_name())
        except (KeyError, TypeError, AttributeError):
            names = []
        if names:
            return names
    modules = dict(model.named_modules())
    stages = [f"layer{i}" for i in range(1, 5) if f"layer{i}" in modules]
    if stages:  # torchvision ResNet and its many look-alikes
        stem = next((s for s in ("relu", "act1", "maxpool") if s in modules), None)
        return ([stem] if stem else []) + stages
    return None


def _leaves(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if name and not any(True for _ in m.children())}


def _probe(model: nn.Module, example: Tensor, names: Iterable[str]) -> list[tuple[str, tuple[int, ...]]]:
    """Call order (name, output shape) of the named modules during one forward pass."""
    calls: list[tuple[str, tuple[int, ...]]] = []
    modules = dict(model.named_modules())
    handles = []
    for name in names:
        def hook(_m, _inp, out, name=name):
            if isinstance(out, Tensor):
                calls.append((name, tuple(out.shape)))
        handles.append(modules[name].register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return calls


def find_feature_modules(model: nn.Module, example: Tensor) -> list[str]:
    """Module paths whose outputs are BiDO's hidden features Z_j (stem, then each stage).

    Declared stages (timm's `feature_info`, torchvision's `layer1..4`) come first. A declared
    stage that never runs as a module (an fx-rewritten model calls only its leaves) is replaced by
    the last leaf it runs. Without declarations, the features are the outputs of the last leaf
    module at each spatial resolution, the generic notion of "stage" of DESIGN.md §3.
    """
    leaves = _leaves(model)
    declared = _declared_feature_modules(model)
    all_names = [n for n, _ in model.named_modules() if n]
    calls = _probe(model, example, all_names)
    called = {n for n, _ in calls}
    if declared:
        chosen = []
        for name in declared:
            if name in called:
                chosen.append(name)
                continue
            inside = [n for n, _ in calls if n.startswith(name + ".") and n in leaves]
            if inside:
                chosen.append(inside[-1])
        if chosen:
            return list(dict.fromkeys(chosen))
    last_by_resolution: dict[tuple[int, ...], str] = {}
    for name, shape in calls:
        if name in leaves and len(shape) == 4:
            last_by_resolution.pop(shape[2:], None)  # keep insertion order = order of last call
            last_by_resolution[shape[2:]] = name
    return list(last_by_resolution.values())


class FeatureTap:
    """Forward hooks that keep the latest output of each named module, for the BiDO terms.

    A module that runs several times per forward pass (torchvision reuses one ReLU) keeps its last
    output, which is the block output.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]):
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"no module named {missing[0]!r} in the model")
        self.names = list(names)
        self.outputs: dict[str, Tensor] = {}
        self._handles = [modules[n].register_forward_hook(self._keep(n)) for n in self.names]

    def _keep(self, name: str):
        def hook(_m, _inp, out):
            self.outputs[name] = out

        return hook

    def features(self) -> list[Tensor]:
        feats = [self.outputs[n] for n in self.names if n in self.outputs]
        self.outputs = {}
        return feats

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
