"""harden on a plain state dict and a plain ImageFolder: the data decides what the file cannot say."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import timm
import torch

from mishield import HardenConfig, harden, load_model
from mishield.errors import BadInputError

ARCH = "timm:test_resnet"


@pytest.fixture
def flat_data(fmnist_dir: Path, tmp_path: Path) -> Path:
    """Three classes, 40 images each, in one folder per class and no val/ split."""
    root = tmp_path / "private"
    for name in sorted(p.name for p in (fmnist_dir / "train").iterdir())[:3]:
        (root / name).mkdir(parents=True)
        for image in sorted((fmnist_dir / "train" / name).iterdir())[:40]:
            shutil.copy(image, root / name / image.name)
    return root


@pytest.fixture
def state_dict_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "plain.pt"
    torch.save(timm.create_model("test_resnet", num_classes=3).state_dict(), path)
    return path


def test_state_dict_takes_the_datas_resolution_and_holds_out_validation(flat_data, state_dict_file, tmp_path, caplog):
    out = tmp_path / "hardened.pt"
    with caplog.at_level(logging.WARNING):
        result = harden(state_dict_file, method="rolss", data=flat_data, epochs=1, stage1_epochs=0,
                        batch_size=32, device="cpu", out=out, load_options={"arch": ARCH})
    # timm's default for this architecture is 160 px; Fashion-MNIST is 28 px, which the prior and the
    # evaluation model also take at 32 (data.default_resolution)
    assert load_model(out).preprocessing.input_size == (3, 32, 32)
    assert "does not record its input size" in caplog.text and "32 px" in caplog.text
    # no val/ folder: a seeded 10 % of the 120 images measures natural accuracy
    assert "no val/ folder" in caplog.text  # (logged by mishield.data)
    assert result.training["val_images"] == 12 and result.training["train_images"] == 108
    assert result.metrics["natural_acc_after"] is not None


def test_explicit_input_size_wins_with_a_warning_when_far_from_the_data(flat_data, state_dict_file, tmp_path, caplog):
    out = tmp_path / "hardened.pt"
    with caplog.at_level(logging.WARNING):
        harden(state_dict_file, method="rolss", data=flat_data, epochs=1, stage1_epochs=0, batch_size=32,
               device="cpu", out=out, val_fraction=0.2, load_options={"arch": ARCH, "input_size": 96})
    assert load_model(out).preprocessing.input_size == (3, 96, 96)
    assert "takes 96 px inputs but the images in the data are about 28 px" in caplog.text
    assert "no val/ folder" not in caplog.text


def test_audit_holds_out_validation_when_data_has_no_val_folder(flat_data, tmp_path, caplog):
    """`mishield audit --val-fraction`: natural accuracy needs held-out images; without val/ a seeded
    10 % (or the given fraction) of the private folder is held out, and the report says how many."""
    from mishield.audit.config import AuditConfig
    from mishield.audit.loading import load_inputs

    config = AuditConfig.preset("ci", load_options={"num_classes": 3})
    with caplog.at_level(logging.WARNING):
        splits = load_inputs(ARCH, flat_data, "none", [ARCH], config).data
    assert len(splits.val) == 12 and len(splits.train) == 108 and "no val/ folder" in caplog.text
    splits = load_inputs(ARCH, flat_data, "none", [ARCH], config.replace(val_fraction=0.25)).data
    assert len(splits.val) == 30


@pytest.fixture
def chance_data(fmnist_dir: Path, tmp_path: Path) -> Path:
    """Four Fashion-MNIST classes: 8 training and 50 validation images each (train/ and val/)."""
    root = tmp_path / "four"
    for split, count in (("train", 8), ("val", 50)):
        for name in sorted(p.name for p in (fmnist_dir / split).iterdir())[:4]:
            (root / split / name).mkdir(parents=True)
            for image in sorted((fmnist_dir / split / name).iterdir())[:count]:
                shutil.copy(image, root / split / name / image.name)
    return root


@pytest.fixture
def untrained_file(tmp_path: Path) -> Path:
    """A plain state dict of an untrained 4-class model: on real images it scores at chance, exactly what
    a trained model read with the wrong mean/std, input size or class order does."""
    from attack_support import tiny_resnet

    torch.manual_seed(0)
    path = tmp_path / "untrained.pt"
    torch.save(tiny_resnet(num_classes=4).state_dict(), path)
    return path


def _harden_cli(model: Path, data: Path, out: Path, *extra) -> list:
    return ["harden", model, "--arch", "attack_support:tiny_resnet", "--data", data, "--epochs", "1", "--batch-size", "16",
            "--device", "cpu", "--workers", "0", "--out", out, *extra]


def test_an_original_at_chance_is_refused_before_training_unless_forced(chance_data, untrained_file, tmp_path, capsys, caplog):
    from clirun import run_cli

    out = tmp_path / "hardened.pt"
    with caplog.at_level(logging.WARNING):
        code, _, err = run_cli(_harden_cli(untrained_file, chance_data, out), capsys)
    assert code == 3, err
    assert "at chance (25.0 % for 4 classes)" in err and "on the 200 validation images" in err
    assert "--mean, --std or --input-size, or --force" in err and "`" not in err  # flags, not parameter names
    assert not out.exists() and not (tmp_path / "hardened.pt.train-state").exists()
    # the assumed normalisation is said, as the assumed input size is
    assert "does not record its normalisation; assuming mean 0.485,0.456,0.406 and std 0.229,0.224,0.225" in caplog.text
    code, _, err = run_cli(_harden_cli(untrained_file, chance_data, out, "--force"), capsys)
    assert code == 0, err
    assert load_model(out, arch="attack_support:tiny_resnet").recipe["training"]["epochs"] == 1


def test_the_chance_check_reads_the_intervals_upper_end(untrained_file):
    from mishield.hardening import _original_above_chance

    loaded = load_model(untrained_file, arch="attack_support:tiny_resnet")
    check = _original_above_chance(loaded, 4)
    check(0.25, 12)  # 3 of 12 right: at chance, but 12 images cannot tell (upper end 53 %)
    check(0.5, 200)  # clearly above chance
    check(None, 0)  # nothing to measure on
    with pytest.raises(BadInputError, match="at chance"):
        check(0.27, 400)


def test_given_mean_and_std_are_not_announced(chance_data, untrained_file, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        harden(untrained_file, config=HardenConfig(epochs=1, batch_size=16, device="cpu", workers=0, force=True),
               data=chance_data, out=tmp_path / "h.pt",
               load_options={"arch": "attack_support:tiny_resnet", "mean": (0.5,), "std": (0.5,)})
    assert "does not record its normalisation" not in caplog.text


def test_one_class_with_a_new_head_is_refused_unless_forced(chance_data, untrained_file, tmp_path):
    one = tmp_path / "one"
    shutil.copytree(chance_data / "train" / min(p.name for p in (chance_data / "train").iterdir()), one / "only")
    config = HardenConfig(epochs=1, batch_size=16, device="cpu", workers=0, reset_head=True, val_fraction=0.25)
    load = {"arch": "attack_support:tiny_resnet"}
    with pytest.raises(BadInputError, match="one class folder"):
        harden(untrained_file, config=config, data=one, out=tmp_path / "h.pt", load_options=load)
    assert not (tmp_path / "h.pt").exists()
    result = harden(untrained_file, config=config.replace(force=True), data=one, out=tmp_path / "h.pt", load_options=load)
    assert result.training["classes"] == ["only"]
