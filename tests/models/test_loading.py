"""Model loading: every accepted format round-trips, unsafe pickles never run, bad input says why."""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import pickle
import sys
import textwrap
import types
import warnings
import zipfile
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

import mishield
from mishield.errors import BadInputError, UsageError
from mishield.models import (
    LoadedModel,
    build_architecture,
    default_preprocessing,
    find_classifier,
    is_arch_spec,
    load_model,
    scan_pickle_globals,
)
from mishield.preprocessing import IMAGENET_MEAN, Preprocessing

TV = "torchvision:resnet18"
SMALL = "torchvision:shufflenet_v2_x0_5"  # 0.35 M parameters: for the many-variant tests


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP's
    # spinning threads make a 32 px forward pass ~100x slower.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _randomised(model: nn.Module, seed: int) -> nn.Module:
    """Seeded weights *and* BatchNorm statistics, so a round-trip that skips buffers shows up."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p * (0.5 + torch.rand(p.shape, generator=g)))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.1, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.1, 0.1, generator=g)
    return model.eval()


@pytest.fixture(scope="module")
def tv_model() -> nn.Module:
    torch.manual_seed(0)
    return _randomised(torchvision.models.resnet18(num_classes=10), seed=1)


@pytest.fixture(scope="module")
def small_model() -> nn.Module:
    return _randomised(torchvision.models.shufflenet_v2_x0_5(num_classes=10), seed=6)


@pytest.fixture(scope="module")
def timm_model() -> nn.Module:
    return _randomised(timm.create_model("test_resnet", pretrained=False, num_classes=7), seed=2)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def _same_outputs(loaded: nn.Module, reference: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), reference(x))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _bad(match_all: list[str], *args, **kwargs) -> str:
    with pytest.raises(BadInputError) as info:
        load_model(*args, **kwargs)
    message = str(info.value)
    for part in match_all:
        assert part in message, f"{part!r} not in {message!r}"
    assert "\n" not in message and "Traceback" not in message
    return message


# --------------------------------------------------------------------------- state dicts


def test_plain_state_dict_round_trip(tmp_path, tv_model, x):
    path = tmp_path / "resnet18.pt"
    torch.save(tv_model.state_dict(), path)
    loaded = load_model(path, arch=TV)
    assert isinstance(loaded, LoadedModel)
    assert loaded.kind == "state_dict" and loaded.arch == TV and loaded.num_classes == 10
    assert loaded.supports_surgery and loaded.recipe is None
    assert loaded.source == path and loaded.source_sha256 == _sha(path)
    assert not loaded.model.training
    assert all(p.device.type == "cpu" for p in loaded.model.parameters())
    assert loaded.preprocessing == Preprocessing()  # torchvision: ImageNet statistics at 224 px
    _same_outputs(loaded.model, tv_model, x)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"state_dict": sd},
        lambda sd: {"model_state_dict": sd, "epoch": 3, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}},
        lambda sd: {"model": sd, "epoch": 3},
        lambda sd: {"module": sd},
        lambda sd: {"state_dict_ema": sd, "epoch": 3},
        lambda sd: {"model_ema": sd},
        lambda sd: {"checkpoint": 1, "state_dict": {"model": sd}},
    ],
    ids=["state_dict", "model_state_dict", "model", "module", "ema_only", "model_ema_only", "doubly_nested"],
)
def test_nested_checkpoints_unwrap(tmp_path, small_model, x, wrap):
    path = tmp_path / "ckpt.pth"
    torch.save(wrap(small_model.state_dict()), path)
    loaded = load_model(path, arch=SMALL)
    _same_outputs(loaded.model, small_model, x)


def test_raw_weights_win_over_ema(tmp_path, small_model, x):
    ema = _randomised(torchvision.models.shufflenet_v2_x0_5(num_classes=10), seed=9)
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict_ema": ema.state_dict(), "state_dict": small_model.state_dict()}, path)
    _same_outputs(load_model(path, arch=SMALL).model, small_model, x)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "model.", "module._orig_mod.", "model.module."])
def test_wrapper_prefixes_are_stripped(tmp_path, small_model, x, prefix):
    path = tmp_path / "wrapped.pt"
    torch.save({prefix + k: v for k, v in small_model.state_dict().items()}, path)
    loaded = load_model(path, arch=SMALL)  # num_classes inferred through the prefix too
    assert loaded.num_classes == 10
    _same_outputs(loaded.model, small_model, x)


class _Wrapper(nn.Module):
    """A model whose real top-level child is called `model`: its keys must keep the prefix."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, num_classes))

    def forward(self, x):
        return self.model(x)


def test_genuine_model_prefix_is_kept(tmp_path, x):
    reference = _randomised(_Wrapper(4), seed=4)
    path = tmp_path / "wrapper.pt"
    torch.save(reference.state_dict(), path)
    loaded = load_model(path, arch=_Wrapper)
    assert loaded.num_classes == 4
    _same_outputs(loaded.model, reference, x)


def test_partial_prefix_is_not_stripped(tmp_path, tv_model):
    sd = tv_model.state_dict()
    mixed = {("module." + k if k.startswith("layer") else k): v for k, v in sd.items()}
    path = tmp_path / "mixed.pt"
    torch.save(mixed, path)
    _bad(["does not fit torchvision:resnet18", "keys missing", "unexpected", "module.layer1"], path, arch=TV)


def test_num_classes_inferred_for_timm(tmp_path, timm_model, x):
    path = tmp_path / "timm.pth"
    torch.save(timm_model.state_dict(), path)
    loaded = load_model(path, arch="timm:test_resnet")
    assert loaded.num_classes == 7
    assert loaded.model.get_classifier().out_features == 7
    _same_outputs(loaded.model, timm_model, x)
    # timm answers for its own input contract (test_resnet: 160 px, mean 0.5)
    assert loaded.preprocessing.input_size == (3, 160, 160)
    assert loaded.preprocessing.mean == (0.5, 0.5, 0.5)


def test_explicit_num_classes_is_used(tmp_path, small_model, x):
    path = tmp_path / "resnet18.pt"
    torch.save(small_model.state_dict(), path)
    assert load_model(path, arch=SMALL, num_classes=10).num_classes == 10
    # A count other than the file's builds a head the file cannot fill: the flag is applied, not
    # overridden by inference, and the mismatch is one sentence naming the flag.
    with pytest.raises(BadInputError, match="--num-classes"):
        load_model(path, arch=SMALL, num_classes=7)
    # With no weights to contradict it, the count alone sizes the head.
    spec_only = load_model(SMALL, num_classes=7)
    assert spec_only.num_classes == 7 and spec_only.model(x).shape == (x.shape[0], 7)


def test_timm_training_checkpoint_with_args(tmp_path, timm_model, x):
    """timm's train.py layout: arch name, argparse Namespace, optimizer state, EMA beside the weights."""
    optimizer = torch.optim.SGD(timm_model.parameters(), lr=0.1, momentum=0.9)
    ckpt = {
        "epoch": 4,
        "arch": "test_resnet",
        "state_dict": timm_model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "version": 2,
        "args": argparse.Namespace(model="test_resnet", lr=0.1, num_classes=7, img_size=None, mean=None),
        "metric": 71.5,
    }
    path = tmp_path / "checkpoint-4.pth.tar"
    torch.save(ckpt, path)
    loaded = load_model(path)
    assert loaded.arch == "timm:test_resnet" and loaded.num_classes == 7
    _same_outputs(loaded.model, timm_model, x)
    # an explicit --arch wins over the file's
    with pytest.raises(BadInputError, match="does not fit torchvision:resnet18"):
        load_model(path, arch=TV)


def test_safetensors_round_trip(tmp_path, small_model, x):
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in small_model.state_dict().items()}, str(path), metadata={"format": "pt"})
    loaded = load_model(path, arch=SMALL)
    assert loaded.kind == "state_dict" and loaded.num_classes == 10
    _same_outputs(loaded.model, small_model, x)


def test_safetensors_recognised_by_content_and_arch_metadata(tmp_path, small_model, x):
    path = tmp_path / "weights.bin"  # wrong extension: the header decides
    save_file(dict(small_model.state_dict()), str(path), metadata={"arch": SMALL})
    loaded = load_model(path)
    assert loaded.arch == SMALL
    _same_outputs(loaded.model, small_model, x)


# --------------------------------------------------------------------------- other formats


@pytest.fixture(scope="module")
def scripted_path(tmp_path_factory, tv_model, x) -> Path:
    path = tmp_path_factory.mktemp("ts") / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jit deprecation notices
        torch.jit.save(torch.jit.trace(tv_model, x), str(path))
    return path


def test_torchscript_archive(scripted_path, tv_model, x):
    before = _sha(scripted_path)
    _bad(["scripted.pt is a TorchScript archive", "--trust-checkpoint"], scripted_path)  # it is a program
    loaded = load_model(scripted_path, trust_checkpoint=True)
    assert _sha(scripted_path) == before
    assert loaded.kind == "torchscript" and loaded.arch is None and not loaded.supports_surgery
    assert loaded.num_classes == 10
    _same_outputs(loaded.model, tv_model, x)


def test_exported_program(tmp_path, tv_model, x):
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(tv_model, (x,)), str(path))
    _bad(["model.pt2 is a torch.export program", "--trust-checkpoint"], path)  # its graph's operators run
    loaded = load_model(path, trust_checkpoint=True)
    assert loaded.kind == "exported" and loaded.arch is None and not loaded.supports_surgery
    assert loaded.num_classes == 10
    assert loaded.preprocessing.input_size == (3, 32, 32)  # the shape it was exported with
    assert load_model(path, input_size=48, trust_checkpoint=True).preprocessing.input_size == (3, 48, 48)
    _same_outputs(loaded.model, tv_model, x)


def test_pickled_module_needs_trust(tmp_path, tv_model, x):
    path = tmp_path / "model.pt"
    torch.save(tv_model, path)
    message = _bad(
        ["model.pt is a pickled Python object", "torchvision.models.resnet.ResNet", "--trust-checkpoint", "more"],
        path,
    )
    assert "torch._utils" not in message  # tensor rebuilding is not code the user must vet
    loaded = load_model(path, trust_checkpoint=True)
    assert loaded.kind == "pickled_module" and loaded.arch is None and loaded.num_classes == 10
    assert not loaded.model.training
    _same_outputs(loaded.model, tv_model, x)


def test_trusted_pickle_holding_a_module_under_model(tmp_path, tv_model, x):
    path = tmp_path / "bundle.pt"
    torch.save({"model": tv_model, "epoch": 1}, path)
    _bad(["would import", "ResNet"], path)
    _same_outputs(load_model(path, trust_checkpoint=True).model, tv_model, x)


def test_trust_does_not_change_safe_files(tmp_path, small_model, x):
    path = tmp_path / "resnet18.pt"
    torch.save(small_model.state_dict(), path)
    assert load_model(path, arch=SMALL, trust_checkpoint=True).kind == "state_dict"


class _Exploit:
    """Unpickling this calls os.system: exactly what a poisoned checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _memo_obfuscated_exploit(marker: Path) -> bytes:
    # posix/system pushed, memoised, popped, then fetched back from the memo for STACK_GLOBAL:
    # a scanner that only looks at the strings right before STACK_GLOBAL misses it.
    command = f"touch {marker}".encode()
    return (
        b"\x80\x04"
        + b"\x8c\x05posix\x94"
        + b"\x8c\x06system\x94"
        + b"00"
        + b"h\x00h\x01\x93"
        + b"\x8c" + bytes([len(command)]) + command
        + b"\x85R."
    )


@pytest.mark.parametrize("how", ["torch.save", "pickle_p0", "pickle_p2", "pickle_p5", "memo_trick"])
def test_malicious_pickle_never_runs(tmp_path, how):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    if how == "torch.save":
        torch.save({"state_dict": _Exploit(marker)}, path)
    elif how == "memo_trick":
        path.write_bytes(_memo_obfuscated_exploit(marker))
    else:
        path.write_bytes(pickle.dumps(_Exploit(marker), protocol=int(how[-1])))
    before = _sha(path)
    message = _bad(["evil.pt is a pickled Python object", "system", "--trust-checkpoint"], path)
    assert "posix.system" in message or "os.system" in message
    assert not marker.exists()
    assert _sha(path) == before


def test_scanner_sees_globals_without_executing():
    names, state = scan_pickle_globals(pickle.dumps([print, os.path.join, nn.Linear], protocol=4))
    assert state == "complete"
    assert names == ["builtins.print", f"{os.path.join.__module__}.join", "torch.nn.modules.linear.Linear"]
    assert scan_pickle_globals(b"\xff\xfe\xfd")[1] == "invalid"
    # naming a global is not importing it
    unknown = b"\x80\x02cmishield_no_such_module_xyz\nrun\nq\x00)Rq\x01."
    assert scan_pickle_globals(unknown)[0] == ["mishield_no_such_module_xyz.run"]
    assert "mishield_no_such_module_xyz" not in sys.modules
    assert scan_pickle_globals(pickle.dumps({"a": 1}, protocol=4)[:-3])[1] == "truncated"


# --------------------------------------------------------------------------- specs and factories


def test_spec_builds_random_model():
    loaded = load_model(TV, num_classes=3)
    assert loaded.kind == "spec" and loaded.arch == TV and loaded.num_classes == 3
    assert loaded.source is None and loaded.source_sha256 is None and not loaded.model.training
    assert loaded.model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_timm_spec_and_input_size_override():
    loaded = load_model("timm:test_resnet", num_classes=5, input_size=64)
    assert loaded.num_classes == 5
    assert loaded.preprocessing.input_size == (3, 64, 64)
    assert loaded.preprocessing.mean == (0.5, 0.5, 0.5)


def test_existing_file_wins_over_spec_shape(tmp_path, monkeypatch, tv_model, x):
    monkeypatch.chdir(tmp_path)
    torch.save(tv_model.state_dict(), tmp_path / "torchvision:resnet18")
    loaded = load_model("torchvision:resnet18", arch=TV)
    assert loaded.kind == "state_dict"


def test_spec_and_conflicting_arch():
    with pytest.raises(UsageError):
        load_model(TV, arch="timm:resnet18")


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    (tmp_path / "mishield_test_factories.py").write_text(
        textwrap.dedent(
            """
            import torch.nn as nn

            def small(num_classes=10):
                return nn.Sequential(
                    nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes)
                )

            def fixed():
                return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 6))

            def not_a_model(num_classes=10):
                return {"num_classes": num_classes}
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "mishield_test_factories"
    sys.modules.pop("mishield_test_factories", None)


def test_factory_spec(tmp_path, factory_module):
    spec = f"{factory_module}:small"
    reference = _randomised(build_architecture(spec, 5), seed=5)
    path = tmp_path / "small.pt"
    torch.save(reference.state_dict(), path)
    loaded = load_model(path, arch=spec)
    assert loaded.arch == spec and loaded.num_classes == 5
    # grayscale: the first conv has one input channel
    assert loaded.preprocessing.input_size == (1, 224, 224) and len(loaded.preprocessing.mean) == 1
    x1 = torch.randn(2, 1, 16, 16)
    _same_outputs(loaded.model, reference, x1)


def test_factory_without_num_classes_parameter(factory_module):
    model = build_architecture(f"{factory_module}:fixed", 6)
    assert model[-1].out_features == 6
    with pytest.raises(BadInputError, match="not a torch.nn.Module"):
        build_architecture(f"{factory_module}:not_a_model", 3)
    with pytest.raises(BadInputError, match="has no attribute"):
        build_architecture(f"{factory_module}:missing", 3)


def test_callable_arch_records_importable_name(tmp_path, tv_model, x):
    path = tmp_path / "resnet18.pt"
    torch.save(tv_model.state_dict(), path)
    loaded = load_model(path, arch=torchvision.models.resnet18)
    assert loaded.arch == "torchvision.models.resnet:resnet18"
    _same_outputs(loaded.model, tv_model, x)
    assert load_model(path, arch=lambda num_classes: torchvision.models.resnet18(num_classes=num_classes)).arch is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("timm:resnet50", True),
        ("torchvision:vit_b_16", True),
        ("my_pkg.models:build", True),
        ("pkg:Class.create", True),
        ("model.pt", False),
        ("dir/model.pt", False),
        ("timm:", False),
        (":factory", False),
    ],
)
def test_is_arch_spec(text, expected):
    assert is_arch_spec(text) is expected


def test_find_classifier():
    assert find_classifier(torchvision.models.resnet18(num_classes=4))[0] == "fc"
    assert find_classifier(torchvision.models.squeezenet1_1(num_classes=4))[0] == "classifier.1"  # a 1x1 conv head
    name, layer = find_classifier(timm.create_model("test_vit", num_classes=3))
    assert name == "head" and layer.out_features == 3


def test_default_preprocessing_uses_vit_image_size():
    vit = torchvision.models.VisionTransformer(
        image_size=64, patch_size=16, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=4
    )
    pre = default_preprocessing(vit, "torchvision:vit_b_16")
    assert pre.input_size == (3, 64, 64) and pre.mean == IMAGENET_MEAN and pre.interpolation == "bilinear"


# --------------------------------------------------------------------------- mishield files (contract with modelfile)


@pytest.fixture
def fake_modelfile(monkeypatch):
    calls = []
    fake = types.SimpleNamespace()
    fake.is_mishield_payload = lambda obj: isinstance(obj, dict) and "mishield" in obj
    def model_from_payload(payload, *, source, arch_override, trust_checkpoint):
        calls.append((payload, source, arch_override, trust_checkpoint))
        return LoadedModel(
            model=nn.Linear(2, 3).eval(), arch="timm:x", num_classes=3, preprocessing=Preprocessing(),
            recipe=payload["mishield"], source=source, kind="mishield",
        )
    fake.model_from_payload = model_from_payload
    monkeypatch.setattr(mishield.models.loading, "modelfile", fake)
    return calls


def test_mishield_pickle_goes_to_modelfile(tmp_path, fake_modelfile):
    path = tmp_path / "hardened.pt"
    torch.save({"mishield": {"arch": "timm:x"}, "state_dict": {"w": torch.zeros(1)}}, path)
    loaded = load_model(path, input_size=96)
    (payload, source, override, trust), = fake_modelfile
    assert source == path and override is None and not trust and payload["mishield"] == {"arch": "timm:x"}
    assert loaded.kind == "mishield" and loaded.source_sha256 == _sha(path)
    assert loaded.preprocessing.input_size == (3, 96, 96)


def test_mishield_safetensors_goes_to_modelfile(tmp_path, fake_modelfile):
    path = tmp_path / "hardened.safetensors"
    save_file({"w": torch.ones(2)}, str(path), metadata={"mishield": '{"arch": "timm:x", "surgery": null}'})
    load_model(path, arch="timm:y", trust_checkpoint=True)
    (payload, _source, override, trust), = fake_modelfile
    assert payload["mishield"] == {"arch": "timm:x", "surgery": None}
    assert torch.equal(payload["state_dict"]["w"], torch.ones(2)) and override == "timm:y" and trust


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_mishield_file_round_trip(tmp_path, small_model, x, suffix):
    """With the real model-file module: an output loads back with no flags and no trust."""
    from mishield.models import save_model

    pre = Preprocessing(input_size=(3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    path = save_model(
        tmp_path / f"out{suffix}", small_model, arch=SMALL, num_classes=10, surgery=None, preprocessing=pre
    )
    before = _sha(path)
    loaded = load_model(path)
    assert loaded.kind == "mishield" and loaded.arch == SMALL and loaded.num_classes == 10
    assert loaded.preprocessing == pre and loaded.recipe["arch"] == SMALL
    assert loaded.source == path and loaded.source_sha256 == before == _sha(path)
    _same_outputs(loaded.model, small_model, x)
    assert load_model(path, input_size=64).preprocessing.input_size == (3, 64, 64)


# --------------------------------------------------------------------------- bad input


def test_missing_path_and_directory(tmp_path):
    _bad(["No such file", "nope.pt"], tmp_path / "nope.pt")
    _bad(["is a directory"], tmp_path)


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.pt"
    path.write_bytes(bytes(range(7, 256)) * 40)
    _bad(["noise.pt is not a PyTorch/safetensors model file"], path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    _bad(["empty.pt is empty"], path)


def test_truncated_files(tmp_path, tv_model):
    full = tmp_path / "full.pt"
    torch.save(tv_model.state_dict(), full)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    _bad(["cut.pt is truncated or damaged"], cut, arch=TV)

    legacy = io.BytesIO()
    torch.save({"w": torch.zeros(100)}, legacy, _use_new_zipfile_serialization=False)
    cut_legacy = tmp_path / "cut_legacy.pt"
    cut_legacy.write_bytes(legacy.getvalue()[:60])
    _bad(["cut_legacy.pt is truncated or damaged"], cut_legacy, arch=TV)

    st = tmp_path / "full.safetensors"
    save_file(dict(tv_model.state_dict()), str(st))
    cut_st = tmp_path / "cut.safetensors"
    cut_st.write_bytes(st.read_bytes()[:-1000])
    _bad(["cut.safetensors is a truncated safetensors file"], cut_st, arch=TV)


def test_zip_that_is_not_a_model(tmp_path):
    path = tmp_path / "images.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a.txt", "hello")
    _bad(["zip archive but not a PyTorch model file"], path)


def test_missing_and_unexpected_keys(tmp_path, tv_model):
    path = tmp_path / "r18.pt"
    torch.save(tv_model.state_dict(), path)
    _bad(
        ["does not fit torchvision:resnet34", "keys missing (layer1.2.conv1.weight, layer1.2.bn1.weight"],
        path,
        arch="torchvision:resnet34",
    )
    extra = dict(tv_model.state_dict(), **{"head.weight": torch.zeros(1), "head.bias": torch.zeros(1)})
    torch.save(extra, path)
    _bad(["2 unexpected (head.weight, head.bias)"], path, arch=TV)


def test_size_mismatch_names_key_and_shapes(tmp_path, tv_model):
    path = tmp_path / "r18.pt"
    torch.save(tv_model.state_dict(), path)
    _bad(["fc.weight has shape (10, 512) in the file but (5, 512) in the model"], path, arch=TV, num_classes=5)


def test_no_architecture_info(tmp_path, small_model):
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": small_model.state_dict()}, path)
    _bad(
        ["weights.pt does not say which architecture it is", "--arch timm:NAME, torchvision:NAME or package.module:"],
        path,
    )


def test_unknown_architectures(tmp_path):
    _bad(["timm:resnet5000", "timm.list_models('*resnet*')"], "timm:resnet5000")
    _bad(["torchvision:resnt18", "did you mean resnet18"], "torchvision:resnt18")
    _bad(["no_such_pkg_xyz", "Cannot import"], "no_such_pkg_xyz.mod:factory")


def test_checkpoint_without_state_dict(tmp_path):
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, path)
    _bad(["meta.pt holds no state dict", "epoch"], path, arch=TV)
    torch.save([torch.zeros(2)], path)
    _bad(["holds a list, not a state dict"], path, arch=TV)


def test_num_classes_conflict_for_frozen_formats(scripted_path):
    _bad(["has 10 classes but --num-classes 4"], scripted_path, num_classes=4, trust_checkpoint=True)


# --------------------------------------------------------------------------- inputs are read-only


def test_input_files_unchanged(tmp_path, tv_model, timm_model, x):
    files = {}
    files["sd"] = tmp_path / "sd.pt"
    torch.save({"model": {"module." + k: v for k, v in tv_model.state_dict().items()}}, files["sd"])
    files["st"] = tmp_path / "w.safetensors"
    save_file(dict(timm_model.state_dict()), str(files["st"]))
    files["pickled"] = tmp_path / "full.pt"
    torch.save(tv_model, files["pickled"])
    before = {k: _sha(p) for k, p in files.items()}
    mtimes = {k: p.stat().st_mtime_ns for k, p in files.items()}
    load_model(files["sd"], arch=TV)
    load_model(files["st"], arch="timm:test_resnet")
    load_model(files["pickled"], trust_checkpoint=True)
    with pytest.raises(BadInputError):
        load_model(files["pickled"])
    assert {k: _sha(p) for k, p in files.items()} == before
    assert {k: p.stat().st_mtime_ns for k, p in files.items()} == mtimes
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in files.values())


def test_mishield_file_of_the_builtin_eval_network_loads_without_flags(tmp_path):
    from mishield.models import save_model
    from mishield.preprocessing import Preprocessing
    from mishield.training.evaluator import DEFAULT_EVAL_ARCH

    model = build_architecture(DEFAULT_EVAL_ARCH, 4).eval()
    path = save_model(tmp_path / "eval.pt", model, arch=DEFAULT_EVAL_ARCH, num_classes=4, surgery=None,
                      preprocessing=Preprocessing(input_size=(3, 32, 32)))
    loaded = load_model(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
