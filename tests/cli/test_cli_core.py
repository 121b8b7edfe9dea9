"""The core commands as a user (or a CI pipeline) meets them: output, exit codes, files."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch
import torchvision
from clirun import run_cli as run


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "resnet18.pt"
    torch.save({"state_dict": torchvision.models.resnet18(num_classes=7).state_dict()}, path)
    return path


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_inspect_json_is_the_only_stdout(checkpoint, capsys):
    code, out, err = run(["inspect", str(checkpoint), "--arch", "torchvision:resnet18", "--input-size", "64",
                          "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["num_classes"] == 7  # inferred from fc.weight
    assert doc["selected"] == ["layer4.0.add", "layer4.1.add"]
    assert doc["rolss_drops_modules"] == ["layer4.0.downsample.0", "layer4.0.downsample.1"]
    assert len(doc["sites"]) == 8 and len(doc["stages"]) == 4


def test_inspect_table_names_sites(checkpoint, capsys):
    code, out, err = run(["inspect", str(checkpoint), "--arch", "torchvision:resnet18", "--input-size", "64"], capsys)
    assert code == 0
    # the result goes to stdout (`mishield inspect m.pt > sites.txt`), nothing of it to stderr
    assert "layer4.0.add" in out and "projection" in out and "stage 3" in out
    assert "layer4.0.add" not in err


def test_inspect_says_when_it_assumes_the_default_size_and_data_sets_the_real_one(checkpoint, tmp_path, capsys):
    from attack_support import noise_splits

    code, out, _ = run(["inspect", str(checkpoint), "--arch", "torchvision:resnet18", "--json"], capsys)
    doc = json.loads(out)
    assert code == 0 and doc["input_size_source"] == "default" and doc["preprocessing"]["input_size"] == [3, 224, 224]
    assert doc["stages"][-1]["resolution"] == "7x7"
    code, out, _ = run(["inspect", str(checkpoint), "--arch", "torchvision:resnet18"], capsys)
    assert "assumes the architecture's default 224 px" in out and "--data" in out
    data = noise_splits(tmp_path / "data", train=2, val=1, size=28)
    code, out, err = run(["inspect", str(checkpoint), "--arch", "torchvision:resnet18", "--data", data, "--json"], capsys)
    doc = json.loads(out)
    assert code == 0, err
    assert doc["input_size_source"] == "data" and doc["preprocessing"]["input_size"] == [3, 32, 32]  # harden's and audit's size
    assert doc["stages"][-1]["resolution"] == "1x1"
    code, out, _ = run(["inspect", str(checkpoint), "--arch", "torchvision:resnet18", "--input-size", "64", "--json"], capsys)
    assert json.loads(out)["input_size_source"] == "input_size"


def test_harden_writes_a_file_that_loads_with_no_flags(checkpoint, tmp_path, capsys):
    before = _sha(checkpoint)
    out_file = tmp_path / "hardened.pt"
    code, out, err = run(["harden", str(checkpoint), "--arch", "torchvision:resnet18", "--method", "ssf",
                          "--alpha", "0.3", "--input-size", "64", "--out", str(out_file), "--json"], capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["alpha"] == 0.3 and summary["sites"] == ["layer4.0.add", "layer4.1.add"]
    assert _sha(checkpoint) == before  # the input is never modified
    code, out, err = run(["inspect", str(out_file), "--json"], capsys)
    assert code == 0, err
    recipe_arch = json.loads(out)["arch"]
    assert recipe_arch == "torchvision:resnet18"

    # never overwrite without --overwrite: exit 2, file untouched
    stamp = _sha(out_file)
    code, _, err = run(["harden", str(checkpoint), "--arch", "torchvision:resnet18", "--input-size", "64",
                        "--out", str(out_file)], capsys)
    assert code == 2 and "--overwrite" in err and _sha(out_file) == stamp


@pytest.mark.parametrize("argv,code,message", [
    (["inspect", "/nonexistent/model.pt"], 3, "No such file"),
    (["harden", "torchvision:resnet18", "--method", "magic", "--out", "{tmp}/x.pt"], 2, "rolss or ssf"),
    (["harden", "torchvision:resnet18", "--method", "rolss", "--alpha", "0.5", "--out", "{tmp}/x.pt"], 2, "--alpha"),
    (["harden", "torchvision:resnet18", "--input-size", "64", "--sites", "fc*", "--out", "{tmp}/x.pt"], 2,
     "contains no skip connection"),
    (["harden", "torchvision:efficientnet_b0", "--input-size", "64", "--sites", "features.7", "--out", "{tmp}/x.pt"],
     2, "contains no skip connection"),
    (["inspect", "torchvision:resnet18", "--stage", "9", "--input-size", "64"], 2, "does not exist"),
])
def test_bad_usage_and_input_exit_codes(argv, code, message, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    got, _, err = run(argv, capsys)
    assert got == code, err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "x.pt").exists()


def test_random_bytes_exit_3_in_a_real_process(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00\x01not a model" * 100)
    proc = subprocess.run([sys.executable, "-m", "mishield", "inspect", str(junk)], capture_output=True, text=True, check=False)
    assert proc.returncode == 3
    assert proc.stdout == ""
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_debug_env_shows_traceback(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"garbage")
    proc = subprocess.run([sys.executable, "-m", "mishield", "inspect", str(junk)], capture_output=True, text=True, check=False,
                          env={**__import__("os").environ, "MISHIELD_DEBUG": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_mean_and_std_override_is_recorded(checkpoint, tmp_path, capsys):
    out_file = tmp_path / "gray.pt"
    code, _, err = run(["harden", str(checkpoint), "--arch", "torchvision:resnet18", "--input-size", "64",
                        "--mean", "0.5", "--std", "0.2,0.3,0.4", "--out", str(out_file)], capsys)
    assert code == 0, err
    recipe = torch.load(out_file, weights_only=True)["mishield"]
    assert recipe["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
    assert recipe["preprocessing"]["std"] == [0.2, 0.3, 0.4]


@pytest.mark.parametrize("flags,message", [
    (["--mean", "0.5,0.5"], "1 or 3 values"),
    (["--std", "0,1,1"], "positive"),
    (["--mean", "a,b"], "comma-separated numbers"),
])
def test_bad_mean_or_std_is_a_usage_error(flags, message, tmp_path, capsys):
    code, _, err = run(["inspect", "torchvision:resnet18", "--input-size", "64", *flags], capsys)
    assert code == 2 and message in err
