"""The training augmentation named in `HardenConfig`, `EvalModelConfig` and TL-DMI's public
pre-training reaches the one training loop and is recorded; left out, every trainer keeps the
photo augmentation. Each test fails when the field is dropped on its way to the `TrainingRecipe`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mishield import harden
from mishield.data import materialize_omniglot
from mishield.errors import UsageError
from mishield.hardening import HardenConfig
from mishield.models import load_model
from mishield.training import loop
from mishield.training.evaluator import EvalModelConfig, train_eval_model

ARCH = "timm:test_resnet"
RUN = {"batch_size": 16, "device": "cpu", "workers": 0, "seed": 0, "epochs": 1}


@pytest.fixture(scope="module")
def characters(tmp_path_factory) -> Path:
    """Two characters of each private alphabet (6 classes), drawers 1-15 train, 16-20 val."""
    return materialize_omniglot(tmp_path_factory.mktemp("omniglot"), "private", characters_per_alphabet=2)


@pytest.fixture(scope="module")
def public(tmp_path_factory) -> Path:
    return materialize_omniglot(tmp_path_factory.mktemp("public"), "public", characters_per_alphabet=1)


@pytest.fixture
def used(monkeypatch) -> list[str]:
    """The augmentation of every training transform the loop builds."""
    seen: list[str] = []
    build = loop.train_transform

    def spy(pre, augmentation="photo", **other):
        seen.append(augmentation)
        return build(pre, augmentation=augmentation, **other)

    monkeypatch.setattr(loop, "train_transform", spy)
    return seen


def test_harden_trains_and_records_the_named_augmentation(characters, tmp_path, used):
    spec = {"num_classes": 6, "input_size": 32}
    torch.manual_seed(0)
    harden(ARCH, config=HardenConfig(schedule="tts", stage1_epochs=1, augmentation="glyph", **RUN), data=characters,
           out=tmp_path / "glyph.pt", load_options=spec)
    assert used and set(used) == {"glyph"}
    assert load_model(tmp_path / "glyph.pt").recipe["training"]["augmentation"] == "glyph"
    used.clear()
    harden(ARCH, config=HardenConfig(schedule="tts", stage1_epochs=1, **RUN), data=characters, out=tmp_path / "photo.pt",
           load_options=spec)
    assert used and set(used) == {"photo"}
    assert "augmentation" not in load_model(tmp_path / "photo.pt").recipe["training"]  # as before the field existed


def test_tl_dmi_pretrains_on_public_data_with_the_same_augmentation(characters, public, tmp_path, used):
    spec = {"num_classes": 6, "input_size": 32}
    harden(ARCH, config=HardenConfig(schedule="tts", stage1_epochs=1, augmentation="glyph", freeze_stages=1,
                                     public_epochs=1, **RUN),
           data=characters, public=public, out=tmp_path / "tl.pt", load_options=spec)
    assert len(used) >= 2 and set(used) == {"glyph"}  # the public pre-training and the private run


def test_the_evaluation_model_trains_and_records_the_named_augmentation(characters, tmp_path, used):
    config = EvalModelConfig(epochs=1, batch_size=16, input_size=32, workers=0, augmentation="glyph")
    train_eval_model(characters, tmp_path / "eval.pt", config=config)
    assert used == ["glyph"]
    assert load_model(tmp_path / "eval.pt").recipe["training"]["augmentation"] == "glyph"


def test_an_unknown_augmentation_is_refused_by_the_config():
    with pytest.raises(UsageError, match="`augmentation` must be one of photo, glyph"):
        HardenConfig(augmentation="mirror")
    with pytest.raises(UsageError, match="`augmentation` needs training data"):
        harden(ARCH, config=HardenConfig(augmentation="glyph"), load_options={"num_classes": 3})
