"""`mishield env` and `mishield --version`: what a bug report needs, and the version without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from clirun import run_cli

import mishield
from mishield import environment

ROOT = Path(__file__).resolve().parents[2]


def test_env_json_validates_and_reports_the_embedded_data_intact(capsys):
    jsonschema = pytest.importorskip("jsonschema")
    from mishield.schemas import load_schema

    code, out, err = run_cli(["env", "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    jsonschema.Draft202012Validator(load_schema("env")).validate(doc)
    import torch

    assert doc["versions"]["torch"] == torch.__version__.split("+")[0] or doc["versions"]["torch"] == torch.__version__
    assert doc["versions"]["mishield"] == mishield.__version__
    assert doc["devices"]["cuda_available"] == torch.cuda.is_available()
    assert doc["devices"]["torch_threads"] >= 1
    data = doc["embedded_data"]
    assert data["intact"] is True and data["sha256"] == environment.EMBEDDED_SHA256 and Path(data["path"]).is_file()


def test_a_changed_embedded_file_is_reported_damaged(monkeypatch):
    # The recorded digest is what the file is compared with: any other value must read as damaged.
    monkeypatch.setattr(environment, "EMBEDDED_SHA256", "0" * 64)
    data = environment.embedded_data()
    assert data["present"] is True and data["intact"] is False and data["sha256"] != "0" * 64


def test_env_human_output_names_versions_devices_and_data(capsys):
    code, out, err = run_cli(["env"], capsys)
    assert code == 0, err
    for word in ("torch", "onnxruntime", "CUDA", "threads", "embedded Fashion-MNIST", "intact"):
        assert word in out


def test_version_is_printed_without_importing_torch():
    code = (
        "import sys, io, contextlib, mishield.cli as cli\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        "    try:\n"
        "        cli.main(['--version'])\n"
        "    except SystemExit as e:\n"
        "        assert not e.code, e.code\n"
        "print(buf.getvalue().strip(), 'torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.stdout.split() == ["mishield", mishield.__version__, "False"]


def test_help_lists_demo_env_and_version(capsys):
    code, out, err = run_cli(["--help"], capsys)
    assert code == 0
    for word in ("demo", "env", "--version"):
        assert word in out + err


def test_env_names_the_torch_build_and_the_asset_it_checks_is_the_data_modules():
    import torch

    from mishield import data, environment

    assert environment.EMBEDDED_ASSET == data.EMBEDDED_ASSET
    build = environment.devices()["torch_build"]
    assert build == ("cpu" if torch.version.cuda is None else f"cuda {torch.version.cuda}")


def test_env_imports_only_torch_of_the_heavy_libraries():
    """`mishield env` took 15 s on a loaded machine while it imported torchvision for one constant; it
    needs torch alone (for the devices), and versions come from package metadata."""
    heavy = ("torchvision", "timm", "onnx", "onnxruntime", "onnxscript", "safetensors", "jinja2", "PIL", "mishield.data",
             "mishield.models")
    code = (
        "import sys, io, contextlib, mishield.cli as cli\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        "        cli.main(['env', '--json'])\n"
        "    except SystemExit as e:\n"
        "        assert not e.code, e.code\n"
        f"print(' '.join(m for m in {heavy!r} if m in sys.modules) or 'none')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.stdout.split() == ["none"], proc.stdout
