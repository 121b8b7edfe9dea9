"""BiDO's HSIC estimator and loss: reference values and the properties an estimator must have."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from mishield.training.bido import (
    FeatureTap,
    bido_loss,
    bido_terms,
    find_feature_modules,
    gaussian_kernel,
    hsic,
    label_kernel,
    linear_kernel,
)


def _ref_gaussian(x: np.ndarray, sigma: float = 5.0) -> np.ndarray:
    m, d = x.shape
    k = np.empty((m, m))
    for i in range(m):
        for j in range(m):
            k[i, j] = math.exp(-float(((x[i] - x[j]) ** 2).sum()) / (2 * sigma * sigma * d))
    return k


def _ref_biased(k: np.ndarray, l: np.ndarray) -> float:
    # Gretton et al.'s V-statistic written out as sums (no centring matrix), over (m - 1)^2
    m = k.shape[0]
    t1 = sum(k[i, j] * l[i, j] for i in range(m) for j in range(m)) / m**2
    t2 = k.sum() * l.sum() / m**4
    t3 = sum(k[i, j] * l[i, q] for i in range(m) for j in range(m) for q in range(m)) / m**3
    return (t1 + t2 - 2 * t3) * m**2 / (m - 1) ** 2


def _ref_nhsic(k: np.ndarray, l: np.ndarray, eps: float = 1e-5) -> float:
    m = k.shape[0]
    h = np.eye(m) - np.ones((m, m)) / m
    rk = (k @ h) @ np.linalg.inv(k @ h + eps * m * np.eye(m))
    rl = (l @ h) @ np.linalg.inv(l @ h + eps * m * np.eye(m))
    return float(np.trace(rk @ rl))


@pytest.fixture
def xy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 6, generator=g, dtype=torch.float64)
    y = torch.tanh(x[:, :3] * 3) + 0.1 * torch.randn(12, 3, generator=g, dtype=torch.float64)
    return x, y


def test_gaussian_kernel_matches_definition(xy):
    x, _ = xy
    k = gaussian_kernel(x.view(12, 2, 3)).double()  # any shape, flattened per sample
    np.testing.assert_allclose(k.numpy(), _ref_gaussian(x.numpy()), atol=1e-6)
    assert torch.allclose(torch.diagonal(k), torch.ones(12, dtype=k.dtype))


def test_biased_hsic_matches_direct_sums(xy):
    x, y = xy
    kx, ky = _ref_gaussian(x.numpy()), _ref_gaussian(y.numpy())
    ours = hsic(torch.from_numpy(kx), torch.from_numpy(ky), "biased").item()
    assert ours == pytest.approx(_ref_biased(kx, ky), rel=1e-4, abs=1e-9)


def test_normalised_hsic_matches_direct_computation(xy):
    x, y = xy
    kx, ky = _ref_gaussian(x.numpy()), _ref_gaussian(y.numpy())
    ours = hsic(torch.from_numpy(kx), torch.from_numpy(ky)).item()
    assert ours == pytest.approx(_ref_nhsic(kx, ky), rel=1e-3)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 1])
    kl = label_kernel(labels, 3)
    onehot = np.eye(3)[labels.numpy()]
    np.testing.assert_array_equal(kl.numpy(), onehot @ onehot.T)
    assert hsic(torch.from_numpy(kx).float(), kl).item() == pytest.approx(_ref_nhsic(kx, onehot @ onehot.T), rel=1e-3)


@pytest.mark.parametrize("estimator", ["nhsic", "biased"])
def test_dependent_beats_independent(estimator):
    g = torch.Generator().manual_seed(1)
    # low-dimensional on purpose: nHSIC counts shared kernel directions above its eps * m ridge,
    # and with dim >> m every direction clears it, so any two samples score about m - 1
    x = torch.randn(64, 3, generator=g)
    dependent = torch.tanh(x) + 0.3 * torch.randn(64, 3, generator=g)
    independent = torch.randn(64, 3, generator=g)
    kx = gaussian_kernel(x)
    h_dep = hsic(kx, gaussian_kernel(dependent), estimator)
    h_ind = hsic(kx, gaussian_kernel(independent), estimator)
    assert h_dep > 2 * h_ind > 0
    assert hsic(kx, kx, estimator) > h_dep


@pytest.mark.parametrize("estimator", ["nhsic", "biased"])
def test_constant_feature_carries_no_dependence(estimator):
    x = torch.randn(32, 8)
    const = torch.full((32, 4, 2, 2), 3.0)
    assert abs(hsic(gaussian_kernel(x), gaussian_kernel(const), estimator).item()) < 1e-4


@pytest.mark.parametrize("estimator", ["nhsic", "biased"])
def test_shared_permutation_leaves_hsic_unchanged(estimator):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 5, generator=g)
    y = x**2 + 0.3 * torch.randn(40, 5, generator=g)
    perm = torch.randperm(40, generator=g)
    a = hsic(gaussian_kernel(x), gaussian_kernel(y), estimator)
    b = hsic(gaussian_kernel(x[perm]), gaussian_kernel(y[perm]), estimator)
    assert a.item() == pytest.approx(b.item(), rel=1e-4)
    # permuting only one side breaks the pairing and lowers the dependence
    c = hsic(gaussian_kernel(x), gaussian_kernel(y[perm]), estimator)
    assert c < a


def test_bido_loss_rewards_label_features_and_penalises_input_copies():
    g = torch.Generator().manual_seed(3)
    labels = torch.arange(48) % 4
    inputs = torch.randn(48, 3, 8, 8, generator=g)
    label_like = torch.nn.functional.one_hot(labels, 4).float() * 10 + 0.01 * torch.randn(48, 4, generator=g)
    input_copy = inputs.clone()
    hx, hy = bido_terms([label_like, input_copy], inputs, labels, 4)
    assert hy[0] > hy[1] and hx[1] > hx[0]
    loss_label = bido_loss([label_like], inputs, labels, 4)
    loss_copy = bido_loss([input_copy], inputs, labels, 4)
    assert loss_label < loss_copy


def test_bido_loss_is_differentiable_and_float32_under_autocast():
    z = torch.randn(16, 4, 3, 3, requires_grad=True)
    inputs, labels = torch.randn(16, 3, 4, 4), torch.arange(16) % 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = bido_loss([z.to(torch.bfloat16)], inputs, labels, 3)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_linear_kernel():
    x = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    assert torch.equal(linear_kernel(x), x @ x.T)
    with pytest.raises(ValueError):
        hsic(torch.eye(3), torch.eye(4))


def test_feature_modules_of_torchvision_and_timm_resnets():
    import timm

    tv = torchvision.models.resnet18(num_classes=5)
    x = torch.randn(1, 3, 32, 32)
    assert [str(p) for p in find_feature_modules(tv, x)] == ["relu", "layer1", "layer2", "layer3", "layer4"]
    tm = timm.create_model("resnet18", num_classes=5, pretrained=False)
    assert [str(p) for p in find_feature_modules(tm, x)] == ["act1", "layer1", "layer2", "layer3", "layer4"]


def _eager_stage_outputs(model, x, names):
    out = {}
    handles = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: out.__setitem__(n, o)) for n in names]
    model(x)
    for h in handles:
        h.remove()
    return [out[n] for n in names]


def test_feature_taps_of_an_fx_rewritten_model_read_the_stage_outputs():
    tv = torchvision.models.resnet18(num_classes=5).eval()
    gm = torch.fx.symbolic_trace(tv)  # stages no longer run as modules, only their leaves do
    x = torch.randn(2, 3, 32, 32)
    points = find_feature_modules(gm, x[:1])
    assert [str(p) for p in points] == [
        "relu", "input of layer2.0.conv1", "input of layer3.0.conv1", "input of layer4.0.conv1", "input of avgpool",
    ]
    tap = FeatureTap(gm, points)
    gm(x)
    names = ["relu", "layer1", "layer2", "layer3", "layer4"]
    for got, want in zip(tap.features(), _eager_stage_outputs(tv, x, names), strict=True):
        assert torch.equal(got, want)


def test_stage_names_from_the_original_model_carry_over_to_its_rewrite():
    import timm

    tm = timm.create_model("resnet10t", num_classes=3, pretrained=False).eval()
    x = torch.randn(2, 3, 32, 32)
    declared = [d["module"] for d in tm.feature_info]
    gm = torch.fx.symbolic_trace(tm)  # no feature_info any more
    assert not hasattr(gm, "feature_info")
    points = find_feature_modules(gm, x[:1], declared=declared)
    tap = FeatureTap(gm, points)
    gm(x)
    for got, want in zip(tap.features(), _eager_stage_outputs(tm, x, declared), strict=True):
        assert torch.allclose(got, want, atol=1e-5)


def test_stages_followed_by_functional_ops_still_give_one_feature_per_stage():
    import timm

    # ConvNeXt's downsampling LayerNorm2d is traced through, so the tap sits a few
    # parameter-free ops after the stage: same shape, one feature per declared stage
    tm = timm.create_model("convnext_atto", num_classes=3, pretrained=False).eval()
    x = torch.randn(2, 3, 32, 32)
    declared = [d["module"] for d in tm.feature_info]
    gm = torch.fx.symbolic_trace(tm)
    tap = FeatureTap(gm, find_feature_modules(gm, x[:1], declared=declared))
    gm(x)
    got = [f.shape for f in tap.features()]
    assert got == [f.shape for f in _eager_stage_outputs(tm, x, declared)]


def test_feature_modules_of_a_plain_cnn_are_the_last_module_per_resolution():
    plain = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2),
    )
    assert [str(p) for p in find_feature_modules(plain, torch.randn(1, 3, 16, 16))] == ["1", "4", "5"]


def test_feature_tap_yields_block_outputs_with_gradients():
    tv = torchvision.models.resnet18(num_classes=3)
    x = torch.randn(4, 3, 32, 32)
    names = find_feature_modules(tv, x[:1])
    tap = FeatureTap(tv, names)
    tv(x)
    feats = tap.features()
    assert [tuple(f.shape[1:]) for f in feats] == [(64, 16, 16), (64, 8, 8), (128, 4, 4), (256, 2, 2), (512, 1, 1)]
    assert all(f.requires_grad for f in feats)
    # layer4's output is what the pooled classifier sees
    pooled = feats[-1].flatten(1)
    assert torch.allclose(tv.fc(pooled), tv(x), atol=1e-5)
    bido_loss(feats, x, torch.tensor([0, 1, 2, 0]), 3).backward()
    assert tv.layer1[0].conv1.weight.grad is not None
    tap.features()
    tap.remove()
    tv(x)
    assert tap.outputs == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernels_stay_on_the_gpu():
    z = torch.randn(32, 64, 4, 4, device="cuda", requires_grad=True)
    x = torch.randn(32, 3, 8, 8, device="cuda")
    loss = bido_loss([z], x, torch.arange(32, device="cuda") % 4, 4)
    assert loss.device.type == "cuda"
    loss.backward()
    assert z.grad.device.type == "cuda"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_gram_on_cuda_sums_exact_products_in_float32():
    from mishield.training.bido import gram

    zb = torch.randn(32, 200_000, device="cuda").bfloat16().requires_grad_()
    g = gram(zb)
    exact = zb.detach().double() @ zb.detach().double().T
    assert g.dtype == torch.float32
    assert torch.allclose(g.double(), exact, rtol=1e-5, atol=1e-2)
    w = torch.randn(32, 32, device="cuda")
    (g * w).sum().backward()
    want = (w + w.T).double() @ zb.detach().double()
    assert zb.grad.dtype == torch.bfloat16
    assert torch.allclose(zb.grad.double(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


@pytest.mark.parametrize("estimator", ["nhsic", "biased"])
def test_batched_terms_equal_pairwise_hsic(estimator):
    g = torch.Generator().manual_seed(4)
    inputs = torch.randn(20, 3, 6, 6, generator=g)
    labels = torch.arange(20) % 4
    feats = [torch.randn(20, 8, 3, 3, generator=g), inputs[:, :2] * 2 + 0.1 * torch.randn(20, 2, 6, 6, generator=g)]
    hx, hy = bido_terms(feats, inputs, labels, 4, estimator=estimator)
    for z, a, b in zip(feats, hx, hy):
        kz = gaussian_kernel(z)
        assert a.item() == pytest.approx(hsic(gaussian_kernel(inputs), kz, estimator).item(), rel=1e-4)
        assert b.item() == pytest.approx(hsic(label_kernel(labels, 4), kz, estimator).item(), rel=1e-4)


def test_gram_gradient_and_channels_last_flattening():
    z = torch.randn(6, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: gaussian_kernel(t), (z,))
    cl = z.detach().float().contiguous(memory_format=torch.channels_last)
    assert torch.allclose(gaussian_kernel(cl), gaussian_kernel(z.detach().float()), atol=1e-6)
    # bf16 features: products are exact, sums in float32 (no bf16 rounding of the Gram matrix)
    zb = torch.randn(6, 300).bfloat16()
    from mishield.training.bido import gram

    assert gram(zb).dtype == torch.float32
    assert torch.allclose(gram(zb).double(), zb.double() @ zb.double().T, rtol=1e-5, atol=1e-4)
