"""harden on a plain state dict and a plain ImageFolder: the data decides what the file cannot say."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import timm
import torch

from mishield import harden, load_model

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
