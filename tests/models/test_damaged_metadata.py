"""Damaged inputs are exit 3 (a bad file) or 2 (a bad option) with one sentence, never exit 1
"internal error" (docs/reliability.md): prior headers and model-file recipes whose values have
the wrong type or an absurd size (refused before anything of that size is allocated), a YAML
recipe nested 20,000 deep, a truncated JPEG among the validation images, a TorchScript
evaluation model, `--batch-size 10**23`, and weights that are NaN or infinite."""

from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from attack_support import noise_image_folder, tiny_resnet
from clirun import run_cli as run
from PIL import Image
from safetensors.torch import save_file

from mishield.models import save_model
from mishield.preprocessing import Preprocessing

TINY = ["--arch", "attack_support:tiny_resnet", "--num-classes", "3", "--input-size", "16"]
SMALL_AUDIT = ["-S", "4", "-C", "1", "-I", "1", "-K", "1", "-A", "1", "--allow-weak-budget", "--allow-weak-evaluator",
               "--device", "cpu"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    from mishield.models.plaincnn import plain_cnn

    root = tmp_path_factory.mktemp("damaged")
    noise_image_folder(root / "data", per_class=4)
    good = root / "good.pt"
    torch.save(tiny_resnet(num_classes=3).state_dict(), good)
    evaluator = root / "eval.pt"
    save_model(evaluator, plain_cnn(3), arch="mishield.models.plaincnn:plain_cnn", num_classes=3, surgery=None,
               preprocessing=Preprocessing((3, 16, 16), (0.5,) * 3, (0.5,) * 3))
    model = root / "model.pt"
    save_model(model, tiny_resnet(num_classes=3), arch="attack_support:tiny_resnet", num_classes=3, surgery=None,
               preprocessing=Preprocessing((3, 16, 16), (0.5,) * 3, (0.5,) * 3))
    return {"root": root, "data": root / "data", "good": good, "eval": evaluator, "model": model}


def _one_sentence(err: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("warning")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "internal error" not in err and "Traceback" not in err


def _audit(files, tmp_path, **changes) -> list:
    options = {"--data": files["data"], "--eval-model": files["eval"], "--prior": "none", "--out": tmp_path / "a"} | changes
    return ["audit", files["good"], *TINY, *[x for kv in options.items() for x in kv], *SMALL_AUDIT]


# --------------------------------------------------------------------------- prior headers


def _prior(path: Path, change) -> Path:
    from mishield.models.dcgan import DCGANGenerator

    generator = DCGANGenerator(latent_dim=8, resolution=32, channels=1, width=8)
    meta = {"format": "mishield.prior/dcgan", "version": 1, "config": generator.config(), "training": {}}
    change(meta)
    state = {k: v.contiguous() for k, v in generator.state_dict().items()}
    save_file(state, str(path), metadata={"mishield": json.dumps(meta)})
    return path


PRIOR_DAMAGE = {
    "unknown-key": (lambda m: m["config"].update(depth=3), "unknown key(s) depth"),
    "no-config": (lambda m: m.pop("config"), "no generator config"),
    "bad-version": (lambda m: m.update(version="one"), "version must be a whole number"),
    "negative-latent": (lambda m: m["config"].update(latent_dim=-8), "latent_dim"),
    "huge-latent": (lambda m: m["config"].update(latent_dim=10**12), "latent_dim"),  # 8 PB of weights
    "string-resolution": (lambda m: m["config"].update(resolution="32"), "resolution"),
}


@pytest.mark.parametrize("case", list(PRIOR_DAMAGE))
def test_a_damaged_prior_header_is_exit_3_before_allocating(case, files, tmp_path, capsys):
    change, words = PRIOR_DAMAGE[case]
    prior = _prior(tmp_path / "p.safetensors", change)
    code, _, err = run(_audit(files, tmp_path, **{"--prior": prior}), capsys)
    assert code == 3, err
    _one_sentence(err)
    assert words in err and "p.safetensors" in err
    assert not (tmp_path / "a").exists()


def test_train_eval_reads_a_damaged_prior_header_as_exit_3(files, tmp_path, capsys):
    prior = _prior(tmp_path / "p.safetensors", PRIOR_DAMAGE["no-config"][0])
    code, _, err = run(["train-eval", "--data", files["data"], "--prior", prior, "--out", tmp_path / "e.pt",
                        "--epochs", "1", "--device", "cpu"], capsys)
    assert code == 3, err
    _one_sentence(err)


# --------------------------------------------------------------------------- model-file recipes


def _recipe(files, path: Path, change) -> Path:
    payload = torch.load(files["model"], weights_only=True)
    recipe = json.loads(json.dumps(payload["mishield"]))
    change(recipe)
    torch.save({"mishield": recipe, "state_dict": payload["state_dict"]}, path)
    return path


def _pre(key, value):
    return lambda r: r["preprocessing"].update({key: value})


RECIPE_DAMAGE = {
    "negative-size": (_pre("input_size", [3, -5, 16]), "input_size"),
    "huge-size": (_pre("input_size", [3, 10**6, 10**6]), "input_size"),  # a 12 TB probe image
    "string-size": (_pre("input_size", "big"), "input_size"),
    "string-mean": (_pre("mean", "grey"), "mean"),
    "zero-std": (_pre("std", [0, 1, 1]), "std"),
    "string-classes": (lambda r: r.update(num_classes="three"), "num_classes"),
    "huge-classes": (lambda r: r.update(num_classes=10**9), "none of its weights has"),  # a head of 10^9 rows
    "string-version": (lambda r: r.update(format_version="x"), "format_version"),
    "bad-surgery-method": (lambda r: r.update(surgery=[{"method": "explode", "sites": ["3.add"]}]), "surgery.method"),
    "string-surgery": (lambda r: r.update(surgery="rolss"), "surgery"),
    "unknown-surgery-site": (lambda r: r.update(surgery=[{"method": "rolss", "sites": ["no.such.site"]}]), "surgery"),
}


@pytest.mark.parametrize("case", list(RECIPE_DAMAGE))
def test_a_damaged_model_recipe_is_exit_3(case, files, tmp_path, capsys):
    change, words = RECIPE_DAMAGE[case]
    path = _recipe(files, tmp_path / "m.pt", change)
    code, out, err = run(["inspect", path, "--arch", "attack_support:tiny_resnet"], capsys)
    assert code == 3, err  # a damaged surgery method was exit 2 (a usage error) before: it is the file's
    _one_sentence(err)
    assert words in err and "m.pt" in err and out == ""


def test_yaml_nested_20000_deep_is_exit_3_quickly(files, tmp_path, capsys):
    recipe = tmp_path / "deep.yaml"
    recipe.write_text("epochs: " + "[" * 20000 + "]" * 20000 + "\n")
    start = time.monotonic()
    code, _, err = run(["harden", files["good"], *TINY, "--recipe", recipe, "--out", tmp_path / "h.pt"], capsys)
    assert time.monotonic() - start < 60  # generous: guards against a hang, not a speed
    assert code == 3, err
    _one_sentence(err)
    assert "deep.yaml" in err


# --------------------------------------------------------------------------- images and evaluators


@pytest.fixture(scope="module")
def truncated_val(files, tmp_path_factory) -> Path:
    """train/ and val/ folders; val/a/cut.jpg is a JPEG whose pixel data is cut off (its header,
    which the scan reads, is intact)."""
    root = tmp_path_factory.mktemp("truncated")
    for split in ("train", "val"):
        shutil.copytree(files["data"], root / split)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "whole.jpg", quality=90)
    data = (root / "whole.jpg").read_bytes()
    (root / "val" / "a" / "cut.jpg").write_bytes(data[: len(data) * 2 // 3])
    (root / "whole.jpg").unlink()
    return root


def test_a_truncated_jpeg_among_the_validation_images_is_exit_3(files, truncated_val, tmp_path, capsys):
    code, _, err = run(_audit(files, tmp_path, **{"--data": truncated_val}), capsys)
    assert code == 3, err
    _one_sentence(err)
    assert "cut.jpg" in err
    argv = ["harden", files["good"], *TINY, "--data", truncated_val, "--epochs", "1", "--batch-size", "4",
            "--out", tmp_path / "h.pt", "--device", "cpu"]
    code, _, err = run(argv, capsys)
    assert code == 3 and "cut.jpg" in err, err


def test_a_torchscript_evaluation_model_is_exit_3_even_when_trusted(files, tmp_path, capsys):
    from mishield.models.plaincnn import plain_cnn

    scripted = tmp_path / "eval-ts.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(plain_cnn(3, width=16)).save(str(scripted))
    code, _, err = run([*_audit(files, tmp_path, **{"--eval-model": scripted}), "--trust-checkpoint"], capsys)
    assert code == 3, err
    _one_sentence(err)
    assert "eval-ts.pt" in err and "TorchScript" in err


HUGE = str(10**23)
BATCH = {
    "audit": lambda f, t: _audit(f, t, **{"--batch-size": HUGE}),
    "harden": lambda f, t: ["harden", f["good"], *TINY, "--data", f["data"], "--batch-size", HUGE, "--out", t / "h.pt"],
    "train-eval": lambda f, t: ["train-eval", "--data", f["data"], "--batch-size", HUGE, "--out", t / "e.pt"],
    "prior train": lambda f, t: ["prior", "train", "--data", f["data"], "--batch-size", HUGE, "--out", t / "p.safetensors"],
    "surrogate train": lambda f, t: ["surrogate", "train", f["good"], *TINY, "--public", f["data"], "--batch-size", HUGE,
                                     "--out", t / "s.pt"],
}


@pytest.mark.parametrize("command", list(BATCH))
def test_a_batch_size_of_10_to_the_23_is_a_usage_error(command, files, tmp_path, capsys):
    code, _, err = run([*BATCH[command](files, tmp_path), "--device", "cpu"], capsys)
    assert code == 2, err
    assert "--batch-size" in err and "internal error" not in err
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------- NaN and infinite weights


def _poisoned(path: Path, key: str, value: float) -> Path:
    state = tiny_resnet(num_classes=3).state_dict()
    state[key].view(-1)[0] = value
    torch.save(state, path)
    return path


@pytest.mark.parametrize(("key", "value", "what"), [
    ("4.conv1.weight", float("nan"), "NaN"),
    ("5.bn2.running_var", float("inf"), "infinite"),  # a buffer counts as much as a parameter
])
@pytest.mark.parametrize("command", ["inspect", "harden", "export"])
def test_non_finite_weights_are_named_when_loading(command, key, value, what, tmp_path, capsys):
    path = _poisoned(tmp_path / "model.pt", key, value)
    argv = {"inspect": ["inspect", path, *TINY], "harden": ["harden", path, *TINY, "--out", tmp_path / "h.pt"],
            "export": ["export", path, *TINY, "--out", tmp_path / "m.onnx"]}[command]
    code, _, err = run(argv, capsys)
    assert code == 3, err
    _one_sentence(err)
    assert f"model.pt has {what} weights in {key}" in err
    assert "--lr" not in err and "--atol" not in err  # not blamed on the training or the export


def test_a_prior_with_nan_weights_is_exit_3(files, tmp_path, capsys):
    from mishield.models.dcgan import DCGANGenerator, save_generator

    generator = DCGANGenerator(latent_dim=8, resolution=32, channels=1, width=8)
    with torch.no_grad():
        generator.net[0].weight[0, 0, 0, 0] = float("nan")
    prior = save_generator(tmp_path / "p.safetensors", generator, training={})
    code, _, err = run(_audit(files, tmp_path, **{"--prior": prior}), capsys)
    assert code == 3, err
    assert "has NaN weights in net.0.weight" in err
