"""Surgery properties (docs/architecture.md §5) on a real model zoo and on a network no registry knows."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mishield.errors import BadInputError, UsageError
from mishield.surgery import SkipRewiredModel, apply_plan, plan_surgery


class NormAct(nn.Module):
    """Batch norm written functionally inside a non-leaf module: the trap of docs/architecture.md §5 —
    tracing it in eval mode would bake `training=False` into the graph."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.register_buffer("position", torch.arange(channels), persistent=False)

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, 1e-5)
        return F.relu(x)


class ToyBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = NormAct(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(cout)
        self.proj = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout else nn.Identity()
        )

    def forward(self, x):
        return F.relu(torch.add(self.norm2(self.conv2(self.norm1(self.conv1(x)))), self.proj(x)))


class ToyResNet(nn.Module):
    """A small residual network defined only here: surgery must find its skips from the graph."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)
        self.stage1 = nn.Sequential(ToyBlock(8, 8, 1), ToyBlock(8, 8, 1))
        self.stage2 = nn.Sequential(ToyBlock(8, 16, 2), ToyBlock(16, 16, 1))
        self.drop = nn.Dropout(0.0)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.stage2(self.stage1(self.stem(x)))
        return self.head(self.drop(x.mean((2, 3))))


def toy_factory(num_classes: int = 5) -> nn.Module:
    return ToyResNet(num_classes)


def _randomise_norms(model: nn.Module) -> None:
    """Non-trivial BN statistics and affine parameters, so equivalence checks are meaningful."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        for name in ("running_mean", "weight", "bias"):
            t = getattr(m, name, None)
            if isinstance(m, (nn.BatchNorm2d, NormAct)) and isinstance(t, torch.Tensor):
                t.data.copy_(torch.randn(t.shape, generator=g) * 0.2 + (1.0 if name == "weight" else 0.0))


@pytest.fixture
def toy():
    torch.manual_seed(0)
    model = ToyResNet().eval()
    _randomise_norms(model)
    return model


def test_toy_sites_and_stages(toy):
    plan = plan_surgery(toy, "rolss", input_size=(3, 16, 16))
    names = [s.name for s in plan.analysis.sites]
    assert names == ["stage1.0.add", "stage1.1.add", "stage2.0.add", "stage2.1.add"]
    assert [s.shortcut for s in plan.analysis.sites] == ["identity", "identity", "projection", "identity"]
    assert plan.analysis.site("stage2.0.add").shortcut_modules == ("stage2.0.proj.0", "stage2.0.proj.1")
    assert [st.resolution for st in plan.analysis.stages] == ["16x16", "8x8"]
    assert plan.selected == ["stage2.0.add", "stage2.1.add"]  # the last stage by default


def test_ssf_alpha_one_is_the_original_in_train_and_eval(toy):
    result = apply_plan(toy, plan_surgery(toy, "ssf", alpha=1.0, input_size=(3, 16, 16)))
    rewired, reference = result.model, copy.deepcopy(toy)
    x = torch.randn(4, 3, 16, 16)
    for mode in (True, False):
        rewired.train(mode)
        reference.train(mode)
        with torch.no_grad():
            assert torch.equal(rewired(x), reference(x))
    # train() updated the functional batch norm's statistics exactly as the original did
    ours, theirs = rewired.state_dict(), reference.state_dict()
    assert set(ours) == set(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    assert not torch.equal(reference.state_dict()["stage1.0.norm1.running_mean"], toy.state_dict()["stage1.0.norm1.running_mean"])


def test_eval_mode_does_not_update_statistics(toy):
    rewired = apply_plan(toy, plan_surgery(toy, "rolss", input_size=(3, 16, 16))).model.eval()
    before = copy.deepcopy(rewired.state_dict())
    with torch.no_grad():
        rewired(torch.randn(4, 3, 16, 16))
    assert all(torch.equal(before[k], v) for k, v in rewired.state_dict().items())


def test_rolss_drops_projection_and_keeps_names(toy):
    result = apply_plan(toy, plan_surgery(toy, "rolss", input_size=(3, 16, 16)))
    assert result.dropped_parameters == sorted(k for k in toy.state_dict() if k.startswith("stage2.0.proj."))
    # An original checkpoint still loads: only the dropped tensors are unexpected.
    missing, unexpected = result.model.load_state_dict(toy.state_dict(), strict=False)
    assert missing == [] and sorted(unexpected) == result.dropped_parameters
    # The non-persistent buffer stays out of the state dict, as in the original.
    assert "stage1.0.norm1.position" not in result.model.state_dict()


def test_input_model_is_not_modified(toy):
    before = copy.deepcopy(toy.state_dict())
    apply_plan(toy, plan_surgery(toy, "rolss", input_size=(3, 16, 16)))
    assert isinstance(toy.stage2[0].proj, nn.Sequential)
    assert all(torch.equal(before[k], v) for k, v in toy.state_dict().items())


def _shortcut_gradient(model: nn.Module, block_conv: str, zero_bn: str, size: int) -> float:
    model = copy.deepcopy(model).eval()
    bn = model.get_submodule(zero_bn)
    with torch.no_grad():
        bn.weight.zero_()
        bn.bias.zero_()
    captured = {}

    def grab(module, args):
        args[0].retain_grad()
        captured["x"] = args[0]

    model.get_submodule(block_conv).register_forward_pre_hook(grab)
    x = torch.randn(2, 3, size, size, requires_grad=True)
    model(x).sum().backward()
    return captured["x"].grad.abs().sum().item()


@pytest.mark.parametrize("build,block_conv,zero_bn,size", [
    (lambda: ToyResNet().eval(), "stage2.1.conv1", "stage2.1.norm2", 16),
    (lambda: __import__("torchvision").models.resnet18(num_classes=10), "layer4.1.conv1", "layer4.1.bn2", 64),
])
def test_no_gradient_through_removed_shortcut(build, block_conv, zero_bn, size):
    torch.manual_seed(0)
    model = build().eval()
    assert _shortcut_gradient(model, block_conv, zero_bn, size) > 0  # the shortcut carries gradient
    hardened = apply_plan(model, plan_surgery(model, "rolss", input_size=(3, size, size))).model
    assert _shortcut_gradient(hardened, block_conv, zero_bn, size) == 0.0


def test_densenet_rolss_zeroes_older_maps_gradient():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.densenet121(num_classes=10).eval()
    plan = plan_surgery(model, "rolss", input_size=(3, 64, 64))
    assert "features.denseblock4.cat" in plan.selected
    assert all(plan.analysis.site(n).kind == "concat" for n in plan.selected)
    hardened = apply_plan(model, plan).model.eval()
    # The block input (transition3's output) reaches denselayer1 directly; every later use of it
    # was a skip. Its gradient must now come only through denselayer1.
    captured = {}

    def grab(module, args):
        args[0].retain_grad()
        captured["x"] = args[0]

    hardened.get_submodule("features.denseblock4.denselayer1.norm1").register_forward_pre_hook(grab)
    # silence denselayer1 so that no path but the removed skips could carry gradient
    with torch.no_grad():
        hardened.get_submodule("features.denseblock4.denselayer1.conv2").weight.zero_()
    hardened(torch.randn(2, 3, 64, 64)).sum().backward()
    assert captured["x"].grad.abs().sum().item() == 0.0


def test_selection_errors(toy):
    with pytest.raises(UsageError, match="contains no skip connection"):
        plan_surgery(toy, "rolss", sites=["head*"], input_size=(3, 16, 16))
    with pytest.raises(UsageError, match="does not exist"):
        plan_surgery(toy, "rolss", stage=5, input_size=(3, 16, 16))
    with pytest.raises(UsageError, match="alpha"):
        plan_surgery(toy, "ssf", alpha=1.5, input_size=(3, 16, 16))
    plan = plan_surgery(toy, "ssf", sites=["stage1.0"], input_size=(3, 16, 16))
    assert plan.selected == ["stage1.0.add"] and plan.alpha == 0.2


def test_model_without_skips_is_refused():
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    plain(torch.zeros(1, 3, 8, 8))
    with pytest.raises(BadInputError, match="no skip connection"):
        plan_surgery(plain, "rolss", input_size=(3, 8, 8))


def test_untraceable_model_is_refused():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            if x.sum() > 0:  # Python control flow on tensor data: fx cannot trace it
                return self.conv(x) + x
            return x

    with pytest.raises(BadInputError, match="cannot trace"):
        plan_surgery(DataDependent(), "rolss", input_size=(3, 8, 8))


def test_second_surgery_keeps_site_names(toy):
    once = apply_plan(toy, plan_surgery(toy, "rolss", input_size=(3, 16, 16))).model
    plan = plan_surgery(once, "ssf", alpha=0.5, input_size=(3, 16, 16))
    assert [s.name for s in plan.analysis.sites] == ["stage1.0.add", "stage1.1.add"]
    twice = apply_plan(once, plan).model
    assert isinstance(twice, SkipRewiredModel)
    twice(torch.randn(1, 3, 16, 16))


def test_deepcopy_keeps_both_graphs(toy):
    rewired = apply_plan(toy, plan_surgery(toy, "rolss", input_size=(3, 16, 16))).model
    clone = copy.deepcopy(rewired)
    x = torch.randn(2, 3, 16, 16)
    clone.eval()
    rewired.eval()
    assert torch.equal(clone(x), rewired(x))
    clone.train()
    clone(x)  # the train graph updates the clone's statistics, not the original's
    assert not torch.equal(clone.state_dict()["stage1.0.norm1.running_mean"],
                           rewired.state_dict()["stage1.0.norm1.running_mean"])


class SpelledBlock(nn.Module):
    """One residual block whose merge is written in a given spelling."""

    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.spelling = spelling
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv2(torch.relu(self.conv1(x)))
        if self.spelling == "operator":
            return y + x
        if self.spelling == "iadd":
            y += x
            return y
        if self.spelling == "torch.add":
            return torch.add(x, y)
        if self.spelling == "method":
            return y.add(x)
        if self.spelling == "inplace":
            return y.add_(x)
        return self.conv2(torch.cat([x, y], dim=1)[:, :4])  # concat: x skips ahead of y


@pytest.mark.parametrize("spelling", ["operator", "iadd", "torch.add", "method", "inplace", "cat"])
def test_every_spelling_of_a_skip_is_found_and_removed(spelling):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), SpelledBlock(spelling), SpelledBlock(spelling)).eval()
    plan = plan_surgery(model, "rolss", input_size=(3, 8, 8))
    assert [s.name.rsplit(".", 1)[0] for s in plan.analysis.sites] == ["1", "2"]
    assert {s.kind for s in plan.analysis.sites} == {"concat" if spelling == "cat" else "add"}
    x = torch.randn(2, 3, 8, 8)
    ssf = apply_plan(model, plan_surgery(model, "ssf", alpha=1.0, input_size=(3, 8, 8))).model.eval()
    with torch.no_grad():
        assert torch.equal(ssf(x), model(x))
        assert not torch.allclose(apply_plan(model, plan).model.eval()(x), model(x))


def test_planning_a_train_mode_model_changes_nothing():
    import torchvision

    model = torchvision.models.resnet18(num_classes=3).train()  # 32 px: the last stage is 1x1
    before = copy.deepcopy(model.state_dict())
    plan = plan_surgery(model, "rolss", input_size=(3, 32, 32))
    assert plan.analysis.stages[-1].resolution == "1x1" and model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # no BN update


def test_switching_modes_reuses_generated_forwards(toy):
    rewired = apply_plan(toy, plan_surgery(toy, "rolss", input_size=(3, 16, 16))).model
    rewired.train()
    train_forward = type(rewired).forward
    rewired.eval()
    eval_forward = type(rewired).forward
    rewired.train()
    assert type(rewired).forward is train_forward and train_forward is not eval_forward
