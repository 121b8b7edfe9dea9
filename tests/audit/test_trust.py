"""Trust in the audit's inputs (mishield.audit.trust; docs/audit.md "Trust checks"), on real Fashion-MNIST.

Private data: Fashion-MNIST classes 0-4 (60 train + 30 val images each, 28 px). One evaluation
model is trained once for the module (2 epochs, ~5 s on one CPU thread); the refusals are
checked both through the library (`mishield.audit`) and the CLI (exit 3, one sentence).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from clirun import run_cli

from mishield.errors import BadInputError

EVAL_ARCH = "attack_support:small_plain_cnn"
TARGET = ["attack_support:tiny_resnet", "--num-classes", "5", "--input-size", "32"]
TINY_ATTACK = ["-S", "8", "-C", "1", "-I", "1", "-K", "1", "-A", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    from mishield.data import materialize_fashion_mnist
    from mishield.training.evaluator import train_eval_model

    root = tmp_path_factory.mktemp("trust")
    private = materialize_fashion_mnist(root / "private", classes=range(5), train_per_class=60, val_per_class=30)
    # noise off: two epochs are too few for the noise augmentation to pay off (52 % instead of over 60 %),
    # and these tests need a trained judge, not a hard-to-fool one
    summary = train_eval_model(private, root / "eval.pt", arch=EVAL_ARCH, epochs=2, lr=2e-3, batch_size=32, device="cpu",
                               noise=0.0)
    return {"root": root, "private": private, "eval": root / "eval.pt", "summary": summary}


def _audit_cli(world, out: Path, eval_model, *extra) -> list[str]:
    return ["audit", *TARGET, "--data", world["private"], "--out", out, "--eval-model", eval_model, "--eval-arch", EVAL_ARCH,
            "--prior", "none", *TINY_ATTACK, *extra]


def _resave(world, name: str, *, classes=None, lr_zero: bool = False) -> Path:
    """The world's evaluation model re-saved with other recorded class names (the weights unchanged)."""
    from mishield.models import load_model, save_model

    loaded = load_model(world["eval"], arch=EVAL_ARCH)
    recipe = dict(loaded.recipe)
    path = world["root"] / name
    save_model(path, loaded.model, arch=EVAL_ARCH, num_classes=loaded.num_classes, surgery=None,
               preprocessing=loaded.preprocessing, extra={"classes": classes, "training": recipe["training"],
                                                         "metrics": recipe["metrics"]}, overwrite=True)
    return path


def test_train_eval_records_classes_fingerprint_and_a_data_sized_input(world):
    from mishield.data import load_image_folders
    from mishield.models import load_model

    s = world["summary"]
    assert s["input_size"] == 32  # 28 px Fashion-MNIST -> the smallest prior resolution holding it, not 224
    loaded = load_model(world["eval"], arch=EVAL_ARCH)
    assert tuple(loaded.preprocessing.input_size[1:]) == (32, 32)
    splits = load_image_folders(world["private"])
    assert loaded.recipe["classes"] == splits.classes
    fp = loaded.recipe["training"]["data_fingerprint"]
    assert fp["images"] == len(splits.train) and len(fp["sha256"]) == 64
    assert loaded.recipe["metrics"]["natural_acc"] > 0.6  # the module's evaluator is a real one


def test_fingerprint_ignores_names_and_order_but_not_content(world, tmp_path):
    import shutil

    from mishield.data import data_fingerprint, load_image_folders

    splits = load_image_folders(world["private"])
    fp, hashes = data_fingerprint(splits.train, splits.classes)
    copy = tmp_path / "copy"
    shutil.copytree(world["private"] / "train", copy)
    first = min((copy / splits.classes[0]).iterdir())
    first.rename(first.with_name("renamed.png"))
    again = load_image_folders(copy)
    assert data_fingerprint(list(reversed(again.train)), again.classes)[0]["sha256"] == fp["sha256"]
    victim = min((copy / splits.classes[1]).iterdir())
    shutil.copy(min((copy / splits.classes[2]).iterdir()), victim)  # one image replaced by another
    assert data_fingerprint(load_image_folders(copy).train, again.classes)[0]["sha256"] != fp["sha256"]
    assert len(set(hashes.tolist())) == len(hashes) == len(splits.train)


def test_a_good_evaluator_passes_and_its_accuracy_at_the_attack_resolution_is_reported(world, tmp_path, capsys):
    code, _, err = run_cli(_audit_cli(world, tmp_path / "out", world["eval"], "--json"), capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    trust = report["eval_model"]["trust"]
    assert trust["classes_match"] is True and trust["resolution"] == [32, 32] and trust["accuracy_n"] == 150
    assert trust["floor"] == pytest.approx(0.6) and trust["chance"] == pytest.approx(0.2)
    assert trust["floor"] <= trust["accuracy_low"] <= trust["accuracy"] <= 1.0  # the floor reads the interval's lower end
    assert trust["fingerprint"]["sha256"] == world["summary"]["data_fingerprint"]["sha256"]
    assert trust["fingerprint_match"] is True and not any("other images" in w for w in report["warnings"])


def test_an_evaluator_trained_on_other_images_is_flagged(world, tmp_path, capsys):
    """Same classes, other images: the recorded data fingerprint differs from the audited data's."""
    import shutil

    other = tmp_path / "private"
    shutil.copytree(world["private"], other)
    for folder in sorted((other / "train").iterdir()):
        min(folder.iterdir()).unlink()  # one training image fewer per class
    code, _, err = run_cli(["audit", *TARGET, "--data", other, "--out", tmp_path / "out", "--eval-model", world["eval"],
                            "--eval-arch", EVAL_ARCH, "--prior", "none", *TINY_ATTACK, "--json"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["eval_model"]["trust"]["fingerprint_match"] is False
    assert any("trained on other images" in w for w in report["warnings"])
    # a gate must not rest on a judge of other data: refused before the attack (exit 3)
    code, _, err = run_cli(["audit", *TARGET, "--data", other, "--out", tmp_path / "gated", "--eval-model", world["eval"],
                            "--eval-arch", EVAL_ARCH, "--prior", "none", *TINY_ATTACK, "--max-attack-acc", "0.5",
                            "--allow-weak-budget", "--trust-checkpoint"], capsys)  # fmt: skip
    assert code == 3 and "trained on other images" in err and "gate" in err, err
    assert not (tmp_path / "gated" / "report.json").exists()


def test_the_accuracy_floor_reads_the_lower_end_of_the_evaluators_interval(world):
    """An evaluator whose point estimate clears the floor but whose Wilson interval does not is refused."""
    from mishield.audit.evaluator import Evaluator
    from mishield.audit.stats import wilson_interval
    from mishield.audit.trust import accuracy_floor, check_evaluator

    class Fixed:  # what check_evaluator reads of an evaluator: its judgement of the validation images
        batch_size, _read = 64, None
        read = Evaluator.read  # the real reading of the images, through the fixed `images` below

        def __init__(self, right: int):
            self.right = right

        def images(self, images):
            n = images.shape[0]
            logits = torch.zeros(n, 5)
            logits[torch.arange(n), torch.arange(n) % 5] = 1.0  # labels cycle through the classes as the items below
            return logits, torch.zeros(n, 1)

    class Evaluation:
        name, provenance, info, model = "e", {}, {}, torch.nn.Linear(1, 1)

    class Data:
        classes, num_classes, train = [f"c{i}" for i in range(5)], 5, []

        def __init__(self, val):
            self.val = val

    floor = accuracy_floor(5)
    # 25 images, 17 right (68 %, above the 60 % floor): the interval's lower end is 48 %, below it
    assert 17 / 25 > floor and wilson_interval(17, 25)[0] < floor
    paths = sorted((world["private"] / "val").rglob("*.png"))[:25]
    items = [(p, i % 5 if i < 17 else (i + 1) % 5) for i, p in enumerate(paths)]
    with pytest.raises(BadInputError, match="interval from 4"):
        check_evaluator(Fixed(17), Evaluation(), [], Data(items), (1, 32, 32))


def test_permuted_class_names_are_refused(world, tmp_path, capsys):
    from mishield.data import load_image_folders

    classes = load_image_folders(world["private"]).classes
    permuted = _resave(world, "permuted.pt", classes=[classes[1], classes[0], *classes[2:]])
    code, _, err = run_cli(_audit_cli(world, tmp_path / "out", permuted), capsys)
    assert code == 3 and "permuted classes" in err, err
    other = _resave(world, "other.pt", classes=["cat", *classes[1:]])
    code, _, err = run_cli(_audit_cli(world, tmp_path / "out2", other), capsys)
    assert code == 3 and "other classes" in err, err


def test_every_evaluation_model_is_checked_and_the_most_leaky_one_counts(world, tmp_path, capsys):
    from mishield.data import load_image_folders
    from mishield.training.evaluator import train_eval_model

    # A good first evaluator does not shield a bad second one: each is checked on its own.
    classes = load_image_folders(world["private"]).classes
    permuted = _resave(world, "permuted2.pt", classes=[classes[2], classes[1], classes[0], *classes[3:]])
    code, _, err = run_cli([*_audit_cli(world, tmp_path / "refused", world["eval"]), "--eval-model", permuted], capsys)
    assert code == 3 and "permuted classes" in err and "permuted2.pt" in err, err
    # Two real evaluators (other seeds): each judges the same reconstructions, the row reads the higher upper end.
    second = tmp_path / "eval2.pt"
    train_eval_model(world["private"], second, arch=EVAL_ARCH, epochs=4, lr=2e-3, batch_size=32, device="cpu", seed=1)
    code, _, err = run_cli([*_audit_cli(world, tmp_path / "out", world["eval"]), "--eval-model", second, "--json"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [e["source"] for e in report["eval_models"]] == [str(world["eval"]), str(second)]
    assert report["eval_model"] == report["eval_models"][0]
    assert all(e["trust"]["floor"] <= e["trust"]["accuracy"] for e in report["eval_models"])
    metrics = report["models"][0]["metrics"]
    figures = metrics["evaluators"]
    assert [f["evaluator"] for f in figures] == ["eval.pt", "eval2.pt"]
    assert [f["evaluator_acc"] for f in figures] == [e["trust"]["accuracy"] for e in report["eval_models"]]
    assert metrics["attack_acc1_interval"]["high"] == max(f["attack_acc1_interval"]["high"] for f in figures)
    chosen = next(f for f in figures if f["evaluator"] == metrics["evaluator"])
    assert chosen["attack_acc1"] == metrics["attack_acc1"] and chosen["evaluator_acc"] == metrics["evaluator_acc"]
    assert 'id="evaluators"' in (tmp_path / "out" / "report.html").read_text()


def test_the_target_as_its_own_evaluator_is_refused(world, tmp_path, capsys):
    import mishield

    # Same file ...
    args = ["audit", world["eval"], "--arch", EVAL_ARCH, "--data", world["private"], "--out", tmp_path / "o",
            "--eval-model", world["eval"], "--eval-arch", EVAL_ARCH, "--prior", "none", *TINY_ATTACK]
    code, _, err = run_cli(args, capsys)
    assert code == 3 and "is the audited model" in err, err
    # ... and the same weights in another file (sha256 differs, the weights do not).
    copy = _resave(world, "copy.pt", classes=mishield.load_model(world["eval"], arch=EVAL_ARCH).recipe["classes"])
    with pytest.raises(BadInputError, match="same weights"):
        mishield.audit([str(world["eval"])], data=world["private"], prior=None, eval_model=str(copy), eval_arch=EVAL_ARCH,
                       out=tmp_path / "o2", device="cpu", load_options={"arch": EVAL_ARCH},
                       attack={"samples": 8, "candidates": 1, "iterations": 1, "keep": 1, "final_augmentations": 1})


def test_an_evaluator_below_the_floor_is_refused_unless_a_smoke_test_says_so(world, tmp_path, capsys):
    from mishield.training.evaluator import train_eval_model

    weak = world["root"] / "weak.pt"
    if not weak.exists():  # lr 1e-12: random weights in effect, but a real file with the right classes
        train_eval_model(world["private"], weak, arch=EVAL_ARCH, epochs=1, lr=1e-12, batch_size=64, device="cpu")
    code, _, err = run_cli(_audit_cli(world, tmp_path / "out", weak), capsys)
    assert code == 3 and "below the floor of 60.0 %" in err, err
    assert len([line for line in err.strip().splitlines() if line.strip()]) <= 3  # one sentence (wrapped)
    code, _, err = run_cli(_audit_cli(world, tmp_path / "out2", weak, "--allow-weak-evaluator", "--json"), capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "out2" / "report.json").read_text())
    assert report["eval_model"]["trust"]["accuracy"] < 0.6
    assert any("below the floor" in w for w in report["warnings"])
    code, _, err = run_cli(_audit_cli(world, tmp_path / "out3", weak, "--allow-weak-evaluator", "--max-attack-acc", "0.5", "--allow-weak-budget"), capsys)
    assert code == 2 and "--max-attack-acc" in err, err


def test_a_chance_level_target_is_refused_for_gating(world, tmp_path, capsys):
    # An untrained target: natural accuracy near 20 %, its Wilson interval over 150 images covers chance.
    code, _, err = run_cli(_audit_cli(world, tmp_path / "out", world["eval"], "--max-attack-acc", "0.5", "--allow-weak-budget",
                                      "--trust-checkpoint"), capsys)  # fmt: skip
    assert code == 3 and "cannot be gated" in err and "chance (20.0 %)" in err, err
    # the factory-built target is a program: a gate on it needs --trust-checkpoint (exit 2 before any attack)
    code, _, err = run_cli(_audit_cli(world, tmp_path / "out2", world["eval"], "--max-attack-acc", "0.5", "--allow-weak-budget"), capsys)
    assert code == 2 and "--trust-checkpoint" in err and "program" in err, err


def test_private_images_among_the_priors_training_images_are_refused(world, tmp_path, capsys):
    from mishield.data import data_fingerprint, load_image_folders
    from mishield.models.dcgan import DCGANGenerator, save_generator

    splits = load_image_folders(world["private"])
    # A prior whose training set held 3 of the private validation images among other (hashed) images.
    _, hashes = data_fingerprint(splits.val[:3], splits.classes)
    prior = save_generator(tmp_path / "prior.safetensors", DCGANGenerator(16, 32, 1, 8).eval(), {},
                           image_hashes=torch.cat([torch.as_tensor(hashes), torch.arange(100)]).sort().values)
    args = _audit_cli(world, tmp_path / "out", world["eval"])
    args[args.index("none")] = prior
    code, _, err = run_cli(args, capsys)
    assert code == 3 and "3 of the 450 private images" in err and "among the prior's training images" in err, err
    # A prior of disjoint images passes the check and says so in the report.
    clean = save_generator(tmp_path / "clean.safetensors", DCGANGenerator(16, 32, 1, 8).eval(), {},
                           image_hashes=torch.arange(100))
    args[args.index(prior)] = clean
    code, _, err = run_cli([*args, "--allow-weak-evaluator", "--json"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["prior"]["provenance_check"] == {"checked": True, "prior_images": 100, "private_images": 450, "overlap": 0}
    # An untrained generator draws noise: the measured quality figure calls it too weak.
    assert report["prior"]["quality"]["nn_ratio"] > report["prior"]["quality"]["weak_ratio"]
    assert any("prior looks too weak" in w for w in report["warnings"])


def test_prior_train_records_hashes_losses_and_writes_samples(tmp_path, capsys):
    from PIL import Image

    from mishield.data import (
        data_fingerprint,
        load_image_folders,
        materialize_fashion_mnist,
    )
    from mishield.models.dcgan import read_prior_hashes, read_prior_meta

    public = materialize_fashion_mnist(tmp_path / "public", classes=[5, 6], train_per_class=31, val_per_class=1)
    out = tmp_path / "prior.safetensors"
    code, _, err = run_cli(["prior", "train", "--data", public, "--out", out, "--epochs", "2", "--batch-size", "16",
                            "--width", "8", "--latent-dim", "16", "--device", "cpu"], capsys)
    assert code == 0, err
    assert "prior epoch 1/2: loss D" in err and "prior epoch 2/2: loss D" in err
    meta = read_prior_meta(out)
    assert meta["config"]["resolution"] == 32  # from the 28 px data, not the old fixed 64
    assert [e["epoch"] for e in meta["training"]["losses"]] == [1, 2]
    splits = load_image_folders(public)
    fingerprint, hashes = data_fingerprint(splits.train + splits.val, splits.classes)  # the prior learns from both
    assert meta["training"]["data_fingerprint"]["sha256"] == fingerprint["sha256"]
    assert read_prior_hashes(out).tolist() == hashes.tolist()
    with Image.open(tmp_path / "prior.safetensors.samples.png") as grid:
        assert grid.size == (8 * 34 + 2, 8 * 34 + 2) and grid.mode == "L"
