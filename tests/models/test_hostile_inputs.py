"""Every file mishield reads is untrusted (docs/reliability.md): damaged or hostile models,
priors, evaluation models, recipes, images and resumable states get exit 3 and one sentence,
never code execution (a marker file proves a payload did not run), a hang or a memory blow-up."""

from __future__ import annotations

import os
import pickle
import shutil
import time
from pathlib import Path

import pytest
import torch
from attack_support import noise_image_folder, tiny_resnet
from clirun import run_cli as run
from PIL import Image

TINY = ["--arch", "attack_support:tiny_resnet", "--num-classes", "3", "--input-size", "16"]


class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile")
    noise_image_folder(root / "data", per_class=4)
    good = root / "good.pt"
    torch.save(tiny_resnet(num_classes=3).state_dict(), good)
    blob = good.read_bytes()
    made = {
        "empty.pt": b"",
        "random.pt": os.urandom(4096),
        "truncated.pt": blob[: len(blob) // 2],
        "zip-junk.pt": b"PK\x03\x04" + os.urandom(1024),
        "truncated.safetensors": b"\x40\x00\x00\x00\x00\x00\x00\x00{\"w\": {\"dtype\": \"F32\"",
        "huge-header.safetensors": (1 << 62).to_bytes(8, "little") + b"{}",
    }
    for name, content in made.items():
        (root / name).write_bytes(content)
    marker = root / "PAYLOAD-RAN"
    for name in ("evil.pt", "evil.pkl"):
        with open(root / name, "wb") as f:
            pickle.dump(Payload(marker), f)
    torch.save({"model": Payload(marker)}, root / "evil-zip.pt")
    return {"root": root, "data": root / "data", "good": good, "marker": marker}


def _one_sentence(err: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("warning: ")]  # warnings may come first
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "Warning" not in err


DAMAGED = ["empty.pt", "random.pt", "truncated.pt", "zip-junk.pt", "truncated.safetensors", "huge-header.safetensors"]


@pytest.mark.parametrize("name", DAMAGED)
def test_a_damaged_model_file_is_exit_3(name, files, capsys):
    code, out, err = run(["inspect", files["root"] / name, *TINY], capsys)
    assert code == 3, err
    _one_sentence(err)
    assert out == ""


@pytest.mark.parametrize("name", DAMAGED)
def test_a_damaged_prior_is_exit_3_without_trust_advice(name, files, tmp_path, capsys):
    argv = ["audit", files["good"], *TINY, "--data", files["data"], "--eval-model", "attack_support:small_plain_cnn",
            "--eval-arch", "attack_support:small_plain_cnn", "--prior", files["root"] / name, "--out", tmp_path / "a",
            "--device", "cpu"]  # fmt: skip
    code, _, err = run(argv, capsys)
    assert code == 3, err
    _one_sentence(err)
    assert "--trust-checkpoint" not in err  # random bytes are not a file to trust
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("name", DAMAGED)
def test_a_damaged_evaluation_model_is_exit_3(name, files, tmp_path, capsys):
    argv = ["audit", files["good"], *TINY, "--data", files["data"], "--eval-model", files["root"] / name,
            "--eval-arch", "attack_support:small_plain_cnn", "--prior", "none", "--out", tmp_path / "a", "--device", "cpu"]
    code, _, err = run(argv, capsys)
    assert code == 3, err
    _one_sentence(err)


@pytest.mark.parametrize("name", ["evil.pt", "evil-zip.pt", "evil.pkl"])
@pytest.mark.parametrize("role", ["model", "eval-model", "prior"])
def test_a_pickle_with_a_payload_never_runs(role, name, files, tmp_path, capsys):
    evil = files["root"] / name
    model = evil if role == "model" else files["good"]
    eval_model = evil if role == "eval-model" else "attack_support:small_plain_cnn"
    prior = evil if role == "prior" else "none"
    argv = ["audit", model, *TINY, "--data", files["data"], "--eval-model", eval_model, "--prior", prior,
            "--out", tmp_path / "a", "--device", "cpu"]
    code, _, err = run(argv, capsys)
    assert not files["marker"].exists(), "unpickling ran the file's code"
    assert code == 3, err
    _one_sentence(err)
    assert "--trust-checkpoint" in err  # it is a real pickle: trusting its source is the user's call


RECIPES = {
    "python-tag.yaml": "epochs: !!python/object/apply:os.system ['touch {marker}']\n",
    "python-name.yaml": "method: !!python/name:os.system\n",
    # a billion laughs: nine levels of nine aliases under a key the recipe may set
    "bomb.yaml": "sites:\n" + "".join(
        f"  - &l{i} [{', '.join([f'*l{i - 1}'] * 9) if i else ', '.join(['lol'] * 9)}]\n" for i in range(9)),
    "wrong-type.yaml": "epochs: many\n",
    "out-of-range.yaml": "method: ssf\nalpha: 7\n",
    "binary.yaml": "\xff\xfe\x00junk",
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_a_hostile_recipe_is_exit_3_quickly(name, files, tmp_path, capsys):
    recipe = tmp_path / name
    text = RECIPES[name].replace("{marker}", str(files["marker"]))
    recipe.write_bytes(text.encode("latin-1"))
    start = time.monotonic()
    code, _, err = run(["harden", files["good"], *TINY, "--recipe", recipe, "--out", tmp_path / "h.pt"], capsys)
    assert time.monotonic() - start < 30
    assert not files["marker"].exists()
    assert code == 3, err
    _one_sentence(err)
    assert not (tmp_path / "h.pt").exists()


def _with_bad_image(files, tmp_path: Path, name: str, write) -> Path:
    data = tmp_path / "data"
    shutil.copytree(files["data"], data)
    write(data / "a" / name)
    return data


BAD_IMAGES = {
    "random.png": lambda p: p.write_bytes(os.urandom(512)),
    "text.jpg": lambda p: p.write_text("not an image\n"),
    "empty.png": lambda p: p.write_bytes(b""),
    "truncated.png": lambda p: p.write_bytes((p.parent / "0.png").read_bytes()[:60]),
    # 225 megapixels in 27 kB: PIL refuses to decode it (a decompression bomb)
    "bomb.png": lambda p: Image.new("1", (15000, 15000)).save(p),
}


@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_a_file_that_is_not_an_image_is_exit_3(name, files, tmp_path, capsys):
    data = _with_bad_image(files, tmp_path, name, BAD_IMAGES[name])
    argv = ["train-eval", "--data", data, "--out", tmp_path / "e.pt", "--arch", "attack_support:small_plain_cnn",
            "--input-size", "16", "--epochs", "1", "--device", "cpu"]
    code, _, err = run(argv, capsys)
    assert code == 3, err
    _one_sentence(err)
    assert name in err and not (tmp_path / "e.pt").exists()


def test_a_junk_resumable_state_is_exit_3(files, tmp_path, capsys):
    out = tmp_path / "h.pt"
    (tmp_path / "h.pt.train-state").write_bytes(os.urandom(2048))
    argv = ["harden", files["good"], *TINY, "--data", files["data"], "--epochs", "1", "--batch-size", "4",
            "--resume", "--out", out, "--device", "cpu"]
    code, _, err = run(argv, capsys)
    assert code == 3, err
    _one_sentence(err)
    assert not out.exists()
