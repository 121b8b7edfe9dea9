"""Surrogates distilled from the target (LOMMA's model augmentation) on real Fashion-MNIST.

As in the demo, the target learns the private classes 0-4 and the attacker distils from its
outputs on the public classes 5-9, which the target never saw. The default tests use a small
target and a small student; the default ResNet-18 surrogate at full embedded size is slow-marked.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from attack_support import train_tiny_target
from clirun import run_cli

from mishield.audit.surrogates import load_surrogates
from mishield.errors import BadInputError, UsageError
from mishield.fileio import sha256_file
from mishield.models import load_model
from mishield.preprocessing import Preprocessing
from mishield.training import TrainingInterrupted
from mishield.training.distillation import (
    MIN_AGREEMENT,
    target_labels,
    train_surrogate,
)

TARGET_ARCH = "attack_support:tiny_resnet"
STUDENT = "attack_support:tiny_resnet"  # small enough for the default suite; the default arch is tested slow
PRE = Preprocessing((3, 32, 32), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
FAST = {"arch": STUDENT, "epochs": 4, "batch_size": 32, "device": "cpu", "workers": 0, "trust_checkpoint": True}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> SimpleNamespace:
    """A small world: 100 train images per private class, 150 + 10 per public class; a target trained 4 epochs
    (measured: it sends 62 % of the held-out public images to its most frequent class)."""
    from mishield.data import materialize_fashion_mnist

    root = tmp_path_factory.mktemp("surrogate")
    private = materialize_fashion_mnist(root / "private", [0, 1, 2, 3, 4], train_per_class=100, val_per_class=10)
    public = materialize_fashion_mnist(root / "public", [5, 6, 7, 8, 9], train_per_class=150, val_per_class=10)
    target = train_tiny_target(private, root / "target.pt", epochs=4)
    flat = root / "flat"  # a flat folder of 38 public images: the layout without class folders
    flat.mkdir()
    for path in sorted((public / "train").glob("*/*.png"))[::20]:
        (flat / f"{path.parent.name}-{path.name}").symlink_to(path)
    other = train_tiny_target(private, root / "other.pt", epochs=1, seed=1)
    return SimpleNamespace(root=root, private=private, public=public, target=target, other=other, flat=flat)


@pytest.fixture(scope="module")
def distilled(world):
    return train_surrogate(world.target, world.public, world.root / "s.pt", **FAST)


def test_the_surrogate_agrees_with_its_target_beyond_its_favourite_class(world, distilled):
    # Measured: 0.91 agreement on the 80 held-out public images at this size. The target sends
    # most public images to a few classes, so agreement is also compared with always answering the
    # target's most frequent class: the student must have learned more than that.
    loaded = load_model(world.target, trust_checkpoint=True)
    from mishield.training.distillation import public_items, split_public

    items, _ = public_items(world.public)
    held_out = target_labels(loaded.model, split_public(items, 0.1, 0)[1], loaded.preprocessing)
    majority = Counter(label for _, label in held_out).most_common(1)[0][1] / len(held_out)
    assert distilled.agreement_n == len(held_out) == 80
    assert distilled.agreement >= 0.8, distilled.agreement
    assert distilled.agreement >= majority + 0.15, (distilled.agreement, majority)
    assert distilled.history[-1]["val_acc"] == pytest.approx(distilled.agreement)  # the trainer's val_acc is agreement


def test_the_file_records_its_target_and_preprocessing(world, distilled):
    loaded = load_model(distilled.out, trust_checkpoint=True)
    record = loaded.recipe["surrogate"]
    assert record["target_sha256"] == sha256_file(world.target) == distilled.target_sha256
    assert record["target_name"] == "target.pt" and record["arch"] == STUDENT
    assert record["agreement"] == distilled.agreement and record["agreement_n"] == 80
    assert record["temperature"] == 4.0 and record["epochs"] == 4
    assert record["public_fingerprint"]["images"] == 800 and len(record["public_fingerprint"]["sha256"]) == 64
    assert loaded.preprocessing == PRE and loaded.num_classes == 5  # fed exactly what the target is fed
    assert not Path(f"{distilled.out}.train-state").exists()


def test_load_surrogates_matches_by_sha256_and_refuses_others(world, distilled):
    models, warnings = load_surrogates([distilled.out], sha256_file(world.target), input_size=PRE.input_size,
                                       trust_checkpoint=True)
    assert len(models) == 1 and models[0].recipe["surrogate"]["arch"] == STUDENT and warnings == []
    with pytest.raises(BadInputError, match="distilled from target.pt"):
        load_surrogates([distilled.out], sha256_file(world.other), trust_checkpoint=True)
    with pytest.raises(BadInputError, match="not a surrogate"):
        load_surrogates([world.other], sha256_file(world.other), trust_checkpoint=True)
    with pytest.raises(BadInputError, match="resolution"):
        load_surrogates([distilled.out], sha256_file(world.target), input_size=(3, 64, 64), trust_checkpoint=True)


def test_a_weak_surrogate_is_loaded_with_a_warning(world, distilled, tmp_path):
    # The same file with its recorded agreement set below the floor (as a badly distilled one would be).
    payload = torch.load(distilled.out, weights_only=True)
    payload["mishield"]["surrogate"]["agreement"] = MIN_AGREEMENT - 0.2
    weak = tmp_path / "weak.pt"
    torch.save(payload, weak)
    models, warnings = load_surrogates([weak], distilled.target_sha256, trust_checkpoint=True)
    assert len(models) == 1 and len(warnings) == 1 and "weak.pt" in warnings[0] and "30.0 %" in warnings[0]


def test_resume_after_an_interruption_gives_the_uninterrupted_result(world, tmp_path):
    settings = {**FAST, "epochs": 2, "batch_size": 8}
    straight = train_surrogate(world.target, world.flat, tmp_path / "straight.pt", **settings)
    out = tmp_path / "r.pt"

    def stop_in_the_second_epoch(stage, done, total):
        if done > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted, match="`resume`"):
        train_surrogate(world.target, world.flat, out, progress=stop_in_the_second_epoch, **settings)
    assert Path(f"{out}.train-state").exists() and not out.exists()
    with pytest.raises(UsageError, match="--resume"):
        train_surrogate(world.target, world.flat, out, **settings)
    with pytest.raises(BadInputError, match="different run"):  # another teacher is another run
        train_surrogate(world.other, world.flat, out, resume=True, **settings)
    resumed = train_surrogate(world.target, world.flat, out, resume=True, **settings)
    assert resumed.resumed_from_epoch == 1 and resumed.agreement == straight.agreement
    losses = lambda r: [(h["epoch"], h["train_loss"], h["val_acc"]) for h in r.history]
    assert losses(resumed) == losses(straight) and len(straight.history) == 2
    a, b = load_model(straight.out, trust_checkpoint=True).model, load_model(out, trust_checkpoint=True).model
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_cli_json_validates_and_a_flat_public_folder_works(world, tmp_path, capsys):
    jsonschema = pytest.importorskip("jsonschema")
    from mishield.schemas import load_schema

    args = ["surrogate", "train", world.target, "--public", world.flat, "--out", tmp_path / "s.pt", "--surrogate-arch", STUDENT,
            "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--trust-checkpoint", "--json"]  # fmt: skip
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    doc = json.loads(out)
    jsonschema.Draft202012Validator(load_schema("surrogate-train")).validate(doc)
    assert doc["public_fingerprint"]["classes"] == ["public"] and doc["public_fingerprint"]["images"] == 38
    assert doc["agreement_n"] == 4 and doc["public_images"] == 34


def test_cli_refusals(world, distilled, tmp_path, capsys):
    base = ["--surrogate-arch", STUDENT, "--epochs", "1", "--device", "cpu", "--trust-checkpoint"]
    code, _, err = run_cli(["surrogate", "train", world.target, "--public", world.public, "--out", world.target,
                            "--overwrite", *base], capsys)  # fmt: skip
    assert code == 2 and "is the input" in err
    image = next((world.public / "train").glob("*/*.png"))
    before = image.read_bytes()
    code, _, err = run_cli(["surrogate", "train", world.target, "--public", world.public, "--out", image,
                            "--overwrite", *base], capsys)  # fmt: skip
    assert code == 2 and "would overwrite the input" in err and image.read_bytes() == before
    code, _, err = run_cli(["surrogate", "train", world.target, "--public", world.public, "--out", distilled.out, *base], capsys)
    assert code == 2 and "already exists" in err
    code, _, err = run_cli(["surrogate", "train", world.target, "--public", tmp_path / "missing", "--out",
                            tmp_path / "x.pt", *base], capsys)  # fmt: skip
    assert code == 3 and "does not exist" in err
    code, _, err = run_cli(["surrogate", "train", world.target, "--public", world.public, "--out", tmp_path / "y.pt",
                            "--temperature", "0", *base], capsys)  # fmt: skip
    assert code == 2 and "temperature" in err


@pytest.mark.slow  # ResNet-18 for the default 10 epochs on 1800 public images: ~90 s on one idle core
def test_the_default_resnet18_surrogate_agrees_with_a_trained_target(fmnist_dir, tmp_path):
    from attack_support import class_disjoint_folders

    from mishield.training.distillation import public_items, split_public

    private, public = class_disjoint_folders(fmnist_dir, tmp_path)
    target = train_tiny_target(private, tmp_path / "target.pt", epochs=4)  # 0.84 accuracy on the private val images
    result = train_surrogate(target, public, tmp_path / "s.pt", device="cpu", workers=0, trust_checkpoint=True)
    loaded = load_model(target, trust_checkpoint=True)
    held_out = target_labels(loaded.model, split_public(public_items(public)[0], 0.1, 0)[1], loaded.preprocessing)
    majority = Counter(label for _, label in held_out).most_common(1)[0][1] / len(held_out)
    # Measured: agreement 0.85 (the target's most frequent class on these images: 0.52).
    assert result.arch == "torchvision:resnet18" and result.agreement_n == 200
    assert result.agreement >= 0.75 and result.agreement >= majority + 0.2, (result.agreement, majority)
    assert result.warnings == []


@pytest.mark.slow  # two fresh processes (each imports torch) and four epochs: 18-40 s on a shared 2-core machine
def test_sigterm_exits_143_and_resume_gives_the_uninterrupted_surrogate(world, distilled, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{repo / 'tests'}", "OMP_NUM_THREADS": "1"}
    out, state = tmp_path / "s.pt", tmp_path / "s.pt.train-state"
    argv = [sys.executable, "-m", "mishield", "surrogate", "train", str(world.target), "--public", str(world.public),
            "--out", str(out), "--surrogate-arch", STUDENT, "--epochs", "4", "--batch-size", "32", "--device", "cpu",
            "--trust-checkpoint"]  # fmt: skip
    proc = subprocess.Popen(argv, env=env, cwd=repo, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 300
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)  # as a scheduler preempting the job would, once an epoch is saved
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    assert "SIGTERM" in err and state.exists() and not out.exists()
    done = subprocess.run([*argv, "--resume"], check=False, env=env, cwd=repo, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not state.exists()
    a, b = load_model(distilled.out, trust_checkpoint=True).model, load_model(out, trust_checkpoint=True).model
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


# -- the surrogates in the audit (`mishield audit --attack lomma --surrogate FILE`) ---------------

AUDIT = ["--data", None, "--prior", "none", "--device", "cpu", "-S", "8", "-C", "2", "-I", "2", "-K", "1", "-A", "1",
         "--allow-weak-evaluator", "--trust-checkpoint", "--eval-arch", TARGET_ARCH]  # fmt: skip


def _audit(world, out, *extra) -> list:
    # The 1-epoch `other` model stands in for an evaluation model (a wiring test: weak, hence --allow-weak-evaluator).
    return ["audit", world.target, "--out", out, "--eval-model", world.other, *[world.private if a is None else a for a in AUDIT], *extra]


def test_the_audit_runs_each_attack_on_each_model_through_its_own_surrogates(world, distilled, tmp_path, capsys):
    code, out, err = run_cli([*_audit(world, tmp_path / "a", "--attack", "ppa,lomma", "--surrogate", distilled.out), "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    from mishield.schemas import load_schema

    pytest.importorskip("jsonschema").validate(doc, load_schema("audit"))
    (model,) = doc["models"]
    assert doc["options"]["attacks"] == ["ppa", "lomma"] and [r["attack"] for r in model["attacks"]] == ["ppa", "lomma"]
    assert model["surrogates"] == [{"source": str(distilled.out), "arch": STUDENT, "agreement": distilled.agreement,
                                    "agreement_n": distilled.agreement_n}]  # fmt: skip
    assert model["attack"] in ("ppa", "lomma") and model["verdict"]["attack"] in ("ppa", "lomma")
    assert {r["grid"] for r in model["attacks"]} == {f"grids/0_target.pt_{a}.png" for a in ("ppa", "lomma")}
    assert all((tmp_path / "a" / r["grid"]).is_file() for r in model["attacks"])
    assert model["attacks"][1]["budget"]["loss"] == "logit" and model["attacks"][0]["budget"]["loss"] == "poincare"
    page = (tmp_path / "a" / "report.html").read_text()
    assert "worst case: " in page and page.count('<rect class="bar') == 2  # one bar per model x attack


def test_the_lomma_attack_needs_each_models_own_surrogate(world, distilled, tmp_path, capsys):
    code, _, err = run_cli(_audit(world, tmp_path / "a", "--attack", "lomma"), capsys)
    assert code == 2 and "has none" in err and "mishield surrogate train" in err, err
    code, _, err = run_cli(_audit(world, tmp_path / "b", "--attack", "lomma", "--surrogate", world.target), capsys)
    assert code == 3 and "not a surrogate model" in err, err
    # A surrogate of another model (here: distilled from `target`, offered to an audit of `other` alone).
    argv = _audit(world, tmp_path / "c", "--attack", "lomma", "--surrogate", distilled.out)
    argv[1] = world.other
    code, _, err = run_cli(argv, capsys)
    assert code == 3 and "none of the audited models" in err, err
    code, _, err = run_cli(_audit(world, tmp_path / "d", "--attack", "ppa,pgd"), capsys)
    assert code == 2 and "--attack takes ppa, lomma" in err, err
