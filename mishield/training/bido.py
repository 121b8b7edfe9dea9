"""BiDO: bilateral dependency optimisation (Peng et al., KDD 2022).

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

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ESTIMATORS = ("nhsic", "biased")
NHSIC_EPS = 1e-5
SIGMA = 5.0


@dataclass(frozen=True)
class BiDOConfig:
    """The BiDO recipe. Defaults are the BiDO authors'."""

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
    """(m, dim) view of a batch, in memory order where possible.

    A Gram matrix does not depend on the order of the feature dimensions, so a channels_last
    activation is flattened as N, H, W, C (a view) instead of being copied into N, C, H, W order.
    """
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
    return x.reshape(x.shape[0], -1)


_MM_TO_FLOAT32: dict[str, bool] = {}  # device type -> whether torch.mm(..., out_dtype=float32) works


class _Gram(torch.autograd.Function):
    """G = X X^T, at least in float32, for an (m, dim) X of any floating dtype.

    Under bf16 autocast the features are bf16, and their exact products summed in float32 are
    what a float32 Gram matrix of the same values would be; on CUDA the tensor cores do that
    directly (`mm` with a float32 output), about ten times faster than a float32 matmul over
    features with up to a million dimensions, and with no float32 copy of the activations.
    The gradient (dG + dG^T) X comes back in X's own dtype, as any bf16 matmul's would.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        if x.dtype in (torch.bfloat16, torch.float16) and _MM_TO_FLOAT32.get(x.device.type, x.is_cuda):
            try:
                return torch.mm(x, x.T, out_dtype=torch.float32)
            except (RuntimeError, NotImplementedError, TypeError):
                _MM_TO_FLOAT32[x.device.type] = False
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        return xf @ xf.T

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        sym = grad + grad.T
        return sym.to(x.dtype) @ x


def gram(x: Tensor) -> Tensor:
    """Float32 Gram matrix of the rows of `x` (any shape, batch first; see `_Gram`)."""
    with torch.autocast(x.device.type, enabled=False):
        return _Gram.apply(_flat(x))


def gaussian_kernel(x: Tensor, sigma: float = SIGMA) -> Tensor:
    """`exp(-||a - b||^2 / (2 sigma^2 dim))` between the rows of `x` (any shape, batch first)."""
    with torch.autocast(x.device.type, enabled=False):
        g = gram(x)
        sq = g.diagonal()
        dim = x[0].numel()
        # ||a||^2 + ||b||^2 - 2 a.b from one Gram matrix instead of an (m, m, dim) difference
        # tensor; clamping removes the small negatives that cancellation leaves on the diagonal.
        dist = (sq[:, None] + sq[None, :] - 2.0 * g).clamp_min(0.0)
        return torch.exp(-dist / (2.0 * sigma * sigma * dim))


def linear_kernel(x: Tensor) -> Tensor:
    with torch.autocast(x.device.type, enabled=False):
        x = _flat(x).float()
        return x @ x.T


def label_kernel(labels: Tensor, num_classes: int) -> Tensor:
    """Linear kernel on one-hot labels: 1 where two samples share a class, else 0."""
    return linear_kernel(F.one_hot(labels.long(), num_classes))


def _right_centre(k: Tensor) -> Tensor:
    # K H = K - (K 1) 1^T / m: subtract each row's mean, without building H.
    return k - k.mean(dim=-1, keepdim=True)


def hsic_biased(k_x: Tensor, k_y: Tensor) -> Tensor:
    """tr(K H L H) / (m - 1)^2 (Gretton et al., 2005). Batched over leading dimensions."""
    with torch.autocast(k_x.device.type, enabled=False):
        k_x, k_y = k_x.float(), k_y.float()
        m = k_x.shape[-1]
        kc = _right_centre(k_x)  # K H
        lc = _right_centre(k_y)  # L H
        # tr(KH LH) = sum_ij (KH)_ij (LH)_ji
        return (kc * lc.transpose(-1, -2)).sum((-2, -1)) / float((m - 1) ** 2)


def _normalised_operator(k: Tensor, eps: float) -> Tensor:
    """R = K H (K H + eps m I)^-1 for one (m, m) kernel or a batch of them, in float64.

    float64 because with sigma = 5 the centred Gaussian kernel has many eigenvalues near the
    eps * m ridge: the solve's condition number is ~ 1 / eps, and in float32 the count of shared
    directions came out several percent wrong (and not permutation-invariant). The matrices are
    only (m, m) and are solved as one batch, so this costs little even on GPUs with slow float64.
    """
    k = k.double()
    m = k.shape[-1]
    kc = _right_centre(k)
    reg = kc + (eps * m) * torch.eye(m, device=k.device, dtype=k.dtype)
    # solve R A = K~ for R; solve_ex skips the error check that would force a GPU->CPU sync
    # every step (A is well conditioned thanks to the ridge).
    r, _ = torch.linalg.solve_ex(reg, kc, left=False)
    return r


def _pair_trace(r_a: Tensor, r_b: Tensor) -> Tensor:
    # sum(R_A * R_B^T) = tr(R_A R_B), batched over leading dimensions
    return (r_a * r_b.transpose(-1, -2)).sum((-2, -1))


def hsic_normalized(k_x: Tensor, k_y: Tensor, eps: float = NHSIC_EPS) -> Tensor:
    """BiDO's normalised HSIC: sum(R_X * R_Y^T) with R = K H (K H + eps m I)^-1."""
    with torch.autocast(k_x.device.type, enabled=False):
        return _pair_trace(_normalised_operator(k_x, eps), _normalised_operator(k_y, eps)).float()


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
    """(HSIC(X, Z_j) for each j, HSIC(Y, Z_j) for each j).

    Equal to calling `hsic` per pair, but each kernel and each normalised operator is computed
    once per step (X's and Y's are shared by every feature) and the small solves run as one batch.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown HSIC estimator {estimator!r}; choose one of {ESTIMATORS}")
    if not features:
        return [], []
    with torch.autocast(inputs.device.type, enabled=False):
        k_x = gaussian_kernel(inputs.detach(), sigma)
        k_y = label_kernel(labels, num_classes)
        k_z = torch.stack([gaussian_kernel(z, sigma) for z in features])
        if estimator == "nhsic":
            with torch.no_grad():
                r_x, r_y = _normalised_operator(torch.stack([k_x, k_y]), NHSIC_EPS).unbind()
            r_z = _normalised_operator(k_z, NHSIC_EPS)
            hx, hy = _pair_trace(r_x, r_z).float(), _pair_trace(r_y, r_z).float()
        else:
            hx, hy = hsic_biased(k_x, k_z), hsic_biased(k_y, k_z)
    return list(hx.unbind()), list(hy.unbind())


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


@dataclass(frozen=True)
class TapPoint:
    """Where a hidden feature is read: a module's output, or (`input`) its first positional input."""

    module: str
    input: bool = False

    def __str__(self) -> str:
        return f"input of {self.module}" if self.input else self.module


def _probe(model: nn.Module, example: Tensor) -> list[tuple[str, tuple[int, ...]]]:
    """Call order (module path, output shape) of every submodule during one forward pass."""
    calls: list[tuple[str, tuple[int, ...]]] = []
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(_m, _inp, out, name=name):
            if isinstance(out, Tensor):
                calls.append((name, tuple(out.shape)))

        handles.append(module.register_forward_hook(hook))
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


def declared_feature_modules(model: nn.Module) -> list[str] | None:
    """Stem and stage module paths a model declares (timm `feature_info`, torchvision `layer1..4`)."""
    return _declared_feature_modules(model)


def find_feature_modules(
    model: nn.Module, example: Tensor, declared: Sequence[str] | None = None
) -> list[TapPoint]:
    """Where BiDO reads its hidden features Z_j (stem, then each stage output).

    `declared` names the stem and stage modules (default: what `model` declares; pass the names
    of the model *before* surgery, whose rewritten copy no longer carries timm's `feature_info`).
    A declared module that runs as a module is tapped at its output. One that no longer runs
    (an fx-rewritten model calls only leaf modules) is tapped at the input of the first leaf that
    runs after it: the stage output itself for ResNets and DenseNets, even though their stages end
    in a functional `add`; a few parameter-free ops later where traced-through code sits between
    stages (ConvNeXt's LayerNorm2d). At the very end of the network: the output of its last leaf. Without declarations the
    features are the outputs of the last leaf at each spatial resolution (docs/architecture.md's notion
    of a stage).
    """
    leaves = _leaves(model)
    if declared is None:
        declared = _declared_feature_modules(model)
    calls = _probe(model, example)
    leaf_calls = [n for n, _ in calls if n in leaves]
    called = {n for n, _ in calls}
    modules = dict(model.named_modules())
    if declared:
        chosen: list[TapPoint] = []
        for name in declared:
            if name in called:
                chosen.append(TapPoint(name))
                continue
            if name not in modules:
                continue
            inside = [i for i, n in enumerate(leaf_calls) if n == name or n.startswith(name + ".")]
            if not inside:
                continue
            after = leaf_calls[inside[-1] + 1 :]
            chosen.append(TapPoint(after[0], input=True) if after else TapPoint(leaf_calls[inside[-1]]))
        if chosen:
            return list(dict.fromkeys(chosen))
    last_by_resolution: dict[tuple[int, ...], str] = {}
    for name, shape in calls:
        if name in leaves and len(shape) == 4:
            last_by_resolution.pop(shape[2:], None)  # keep insertion order = order of last call
            last_by_resolution[shape[2:]] = name
    return [TapPoint(n) for n in last_by_resolution.values()]


class FeatureTap:
    """Forward hooks that keep the latest value at each tap point, for the BiDO terms.

    A module that runs several times per forward pass (torchvision reuses one ReLU) keeps its last
    output, which is the block output.
    """

    def __init__(self, model: nn.Module, points: Sequence[TapPoint | str]):
        modules = dict(model.named_modules())
        self.points = [p if isinstance(p, TapPoint) else TapPoint(p) for p in points]
        missing = [p.module for p in self.points if p.module not in modules]
        if missing:
            raise ValueError(f"no module named {missing[0]!r} in the model")
        self.outputs: dict[TapPoint, Tensor] = {}
        self._handles = []
        for p in self.points:
            if p.input:
                self._handles.append(modules[p.module].register_forward_pre_hook(self._keep_input(p)))
            else:
                self._handles.append(modules[p.module].register_forward_hook(self._keep_output(p)))

    def _keep_output(self, point: TapPoint):
        def hook(_m, _inp, out):
            self.outputs[point] = out

        return hook

    def _keep_input(self, point: TapPoint):
        def hook(_m, inp):
            if inp and isinstance(inp[0], Tensor):
                self.outputs[point] = inp[0]

        return hook

    def features(self) -> list[Tensor]:
        """The values captured by the last forward pass, in tap order (and forget them)."""
        feats = [self.outputs[p] for p in self.points if p in self.outputs]
        self.outputs = {}
        return feats

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
