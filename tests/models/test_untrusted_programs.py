"""Files that are programs, or that name code, never run without `--trust-checkpoint`
(docs/reliability.md, "No code runs from a file"): TorchScript archives and `torch.export` `.pt2`
files wherever a model, prior, evaluation model or surrogate is read, and an architecture a
weights-only checkpoint records as `package.module:factory`. A marker file or a recording probe
shows that nothing ran; exit 3 and one sentence that names the flag."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from attack_support import noise_image_folder, tiny_resnet
from clirun import run_cli as run
from safetensors.torch import save_file
from torch import nn

from mishield.errors import BadInputError
from mishield.models import load_model, save_model
from mishield.preprocessing import Preprocessing

TESTS = Path(__file__).parent
ROOT = TESTS.parent
TINY = ["--arch", "attack_support:tiny_resnet", "--num-classes", "3", "--input-size", "16"]


class _Trap(nn.Module):
    """TorchScript calls `__setstate__` while loading: this one writes a file at `path`."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> tuple[str, bool]:
        return (self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]) -> None:
        self.path = state[0]
        self.training = state[1]
        torch.save(torch.zeros(1), self.path)


class _Classifier(nn.Module):
    def __init__(self, marker: str):
        super().__init__()
        self.trap = _Trap(marker)
        self.net = tiny_resnet(num_classes=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.trap(x))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("programs")
    noise_image_folder(root / "data", per_class=4)
    marker = root / "PROGRAM-RAN"
    good = root / "good.pt"
    torch.save(tiny_resnet(num_classes=3).state_dict(), good)
    evil = root / "evil-ts.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jit deprecation notices
        torch.jit.script(_Classifier(str(marker))).save(str(evil))
        marker.unlink(missing_ok=True)  # scripting copies the module (and runs the trap) once
        torch.jit.load(str(evil))  # the payload is real: loading the archive runs it
    assert marker.exists()
    marker.unlink()
    program = root / "model.pt2"
    model = tiny_resnet(num_classes=3).eval()
    torch.export.save(torch.export.export(model, (torch.randn(2, 3, 16, 16),)), str(program))
    return {"root": root, "data": root / "data", "good": good, "evil": evil, "marker": marker, "pt2": program}


def _one_sentence(err: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("warning: ")]  # warnings may come first
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err


def _audit(files, tmp_path, *, model=None, prior="none", eval_model="attack_support:small_plain_cnn") -> list:
    return ["audit", model or files["good"], *TINY, "--data", files["data"], "--eval-model", eval_model, "--prior", prior,
            "--out", tmp_path / "a", "--device", "cpu"]


ROLES = {
    "inspect": lambda f, t: ["inspect", f["evil"]],
    "export": lambda f, t: ["export", f["evil"], "--input-size", "16", "--out", t / "m.onnx"],
    "harden": lambda f, t: ["harden", f["evil"], "--out", t / "h.pt"],
    "audit --prior": lambda f, t: _audit(f, t, prior=f["evil"]),
    "audit --eval-model": lambda f, t: _audit(f, t, eval_model=f["evil"]),
    "audit MODEL": lambda f, t: _audit(f, t, model=f["evil"]),
    "surrogate train": lambda f, t: ["surrogate", "train", f["evil"], "--public", f["data"], "--out", t / "s.pt",
                                     "--device", "cpu"],
}


@pytest.mark.parametrize("role", list(ROLES))
def test_a_torchscript_file_never_loads_without_the_flag(role, files, tmp_path, capsys):
    code, out, err = run(ROLES[role](files, tmp_path), capsys)
    assert not files["marker"].exists(), "loading the TorchScript archive ran its __setstate__"
    assert code == 3, err
    _one_sentence(err)
    assert "TorchScript" in err and "--trust-checkpoint" in err
    assert out == "" and not any(tmp_path.iterdir())  # nothing written, the attack never started


def test_with_the_flag_the_archive_is_loaded(files, capsys):
    """The refusal above is the flag's doing: with it, mishield loads the file (and its code runs)."""
    run(["inspect", files["evil"], "--trust-checkpoint", "--input-size", "16"], capsys)
    assert files["marker"].exists()
    files["marker"].unlink()


@pytest.mark.parametrize("argv", [
    lambda f, t: ["inspect", f["pt2"]],
    lambda f, t: ["export", f["pt2"], "--out", t / "m.onnx"],
    lambda f, t: _audit(f, t, eval_model=f["pt2"]),
])
def test_a_torch_export_program_needs_the_flag(argv, files, tmp_path, capsys):
    code, _, err = run(argv(files, tmp_path), capsys)
    assert code == 3, err
    _one_sentence(err)
    assert "torch.export program" in err and "--trust-checkpoint" in err
    assert load_model(files["pt2"], trust_checkpoint=True).kind == "exported"


# --------------------------------------------------------------------------- recorded architectures


class _Probe:
    """Stands in for a harmful function: records that mishield called it."""

    def __init__(self):
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return tiny_resnet(num_classes=3)


def _state_dict() -> dict:
    return tiny_resnet(num_classes=3).state_dict()


def _with_arch(path: Path, arch: str) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in _state_dict().items()}, str(path), metadata={"arch": arch})
    else:
        torch.save({"arch": arch, "state_dict": _state_dict(), "epoch": 3}, path)
    return path


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_recorded_factory_is_never_imported_and_called(suffix, tmp_path, monkeypatch, capsys):
    import tempfile

    probe = _Probe()
    monkeypatch.setattr(tempfile, "mkdtemp", probe)  # the example: `tempfile:mkdtemp`
    path = _with_arch(tmp_path / f"ckpt{suffix}", "tempfile:mkdtemp")
    code, out, err = run(["inspect", path], capsys)
    assert probe.calls == 0, "the file's arch was called"
    assert code == 3, err
    _one_sentence(err)
    assert "tempfile:mkdtemp" in err and "--arch" in err and "--trust-checkpoint" in err and out == ""
    # the same file loads once the user vouches for the factory, on the command line or by trust
    assert load_model(path, arch="attack_support:tiny_resnet").num_classes == 3
    load_model(path, trust_checkpoint=True)
    assert probe.calls >= 1


def test_os_abort_in_a_checkpoint_does_not_kill_the_process(tmp_path):
    path = _with_arch(tmp_path / "abort.pt", "os:abort")
    environ = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
    result = subprocess.run([sys.executable, "-m", "mishield", "inspect", str(path)], capture_output=True, text=True,
                            env=environ, cwd=ROOT, timeout=300, check=False)
    assert result.returncode == 3, (result.returncode, result.stderr)  # 134 (SIGABRT) before
    assert "os:abort" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("arch", [
    "attack_support:tiny_resnet",  # code on the path, but chosen by the file
    "mishield.models.plaincnn:plain_cnn.__class__",  # below a trusted factory: not that factory
])
def test_only_registry_names_and_mishields_own_factories_pass(arch, tmp_path):
    path = _with_arch(tmp_path / "ckpt.pt", arch)
    with pytest.raises(BadInputError, match="records the architecture .* --trust-checkpoint"):
        load_model(path)


def test_registry_names_and_own_factories_load_without_flags(tmp_path):
    import torchvision

    from mishield.models.plaincnn import plain_cnn

    resnet = tmp_path / "tv.pt"
    torch.save({"arch": "torchvision:resnet18", "state_dict": torchvision.models.resnet18(num_classes=3).state_dict()}, resnet)
    assert load_model(resnet).num_classes == 3
    own = tmp_path / "own.pt"
    torch.save({"arch": "mishield.models.plaincnn:plain_cnn", "state_dict": plain_cnn(3).state_dict()}, own)
    assert load_model(own).arch == "mishield.models.plaincnn:plain_cnn"


def test_a_mishield_recipe_naming_a_factory_needs_confirmation(tmp_path, monkeypatch):
    import tempfile

    probe = _Probe()
    monkeypatch.setattr(tempfile, "mkdtemp", probe)
    path = tmp_path / "m.pt"
    save_model(path, tiny_resnet(num_classes=3), arch="tempfile:mkdtemp", num_classes=3, surgery=None,
               preprocessing=Preprocessing((3, 16, 16)))
    with pytest.raises(BadInputError, match="confirm it with --arch tempfile:mkdtemp"):
        load_model(path)
    assert probe.calls == 0
