"""The defences end to end through `mishield.harden`: each option reaches the one training loop,
changes what it should, and is recorded in the output file, the training log and `to_dict()`.

Every test compares with the same `harden` run with the defence off (or its sign flipped), on the
embedded Fashion-MNIST images and a tiny ResNet, so it fails when the option is dropped on its way
from `HardenConfig` to the `TrainingRecipe`, or reaches it with the wrong sign.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from attack_support import tiny_resnet

from mishield import harden
from mishield.data import (
    ImageDataset,
    eval_transform,
    load_image_folders,
    materialize_fashion_mnist,
)
from mishield.errors import UsageError
from mishield.hardening import HardenConfig
from mishield.models import load_model, save_model
from mishield.preprocessing import Preprocessing
from mishield.training import RunOptions, TrainingRecipe, fit, loop, plan_freeze

PRE = Preprocessing((3, 16, 16), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
ARCH = "attack_support:tiny_resnet"
RUN = {"batch_size": 32, "device": "cpu", "workers": 0, "seed": 0, "schedule": "finetune"}


@pytest.fixture(scope="module")
def private(tmp_path_factory) -> Path:
    """Three private classes (t-shirt, trouser, sneaker): 60 training and 20 held-out images each."""
    return materialize_fashion_mnist(tmp_path_factory.mktemp("private"), [0, 1, 7], train_per_class=60, val_per_class=20)


@pytest.fixture(scope="module")
def public(tmp_path_factory) -> Path:
    """Four public classes the private model never sees (sandal, shirt, bag, ankle boot)."""
    return materialize_fashion_mnist(tmp_path_factory.mktemp("public"), [5, 6, 8, 9], train_per_class=40, val_per_class=10)


@pytest.fixture(scope="module")
def checkpoint(private, tmp_path_factory) -> Path:
    """A tiny ResNet trained for 3 epochs on the private classes: the user's model."""
    torch.manual_seed(0)
    model = tiny_resnet(3)
    splits = load_image_folders(private)
    fit(model, splits, PRE, TrainingRecipe("finetune", epochs=3, lr=3e-3, batch_size=32), options=RunOptions(device="cpu", workers=0))
    out = tmp_path_factory.mktemp("model") / "model.pt"
    save_model(out, model.eval(), arch=ARCH, num_classes=3, surgery=None, preprocessing=PRE, extra={"classes": splits.classes})
    return out


def _harden(checkpoint, private, out, public=None, **fields):
    torch.manual_seed(0)
    return harden(checkpoint, config=HardenConfig(**{**RUN, **fields}), data=private, public=public, out=out,
                  load_options={"arch": ARCH})


def _load(path):
    return load_model(path, arch=ARCH)  # the architecture is a test factory: confirmed, as --arch would


def _wrong_class_log_prob(model, private) -> float:
    """Mean log-probability the model gives the wrong classes of the held-out images."""
    items = load_image_folders(private).val
    dataset = ImageDataset(items, eval_transform(PRE))
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    y = torch.tensor([label for _, label in items])
    with torch.no_grad():
        log_p = F.log_softmax(model.eval()(x), 1)
    return log_p[F.one_hot(y, 3) == 0].mean().item()


def test_negative_label_smoothing_lowers_wrong_class_log_probabilities_and_is_recorded(checkpoint, private, tmp_path):
    """measured: plain -6.8, neg LS -8.9, both at 96.7 % natural accuracy (RoLSS, 4 epochs from the checkpoint, smoothing from epoch 0)"""
    plain = _harden(checkpoint, private, tmp_path / "plain.pt", method="rolss", epochs=4, lr=3e-3)
    smoothed = _harden(checkpoint, private, tmp_path / "nls.pt", method="rolss", epochs=4, lr=3e-3, neg_ls=-0.05,
                       neg_ls_start=0, neg_ls_ramp=0)
    lp_plain, lp_smoothed = _wrong_class_log_prob(plain.model, private), _wrong_class_log_prob(smoothed.model, private)
    assert lp_smoothed < lp_plain - 0.3, (lp_smoothed, lp_plain)
    assert [h["label_smoothing"] for h in smoothed.history] == [-0.05] * 4
    assert [h["label_smoothing"] for h in plain.history] == [None] * 4
    expected = {"alpha": -0.05, "start_epoch": 0, "ramp_epochs": 0}
    assert _load(tmp_path / "nls.pt").recipe["training"]["label_smoothing"] == expected
    assert "label_smoothing" not in _load(tmp_path / "plain.pt").recipe["training"]
    doc = smoothed.to_dict()
    assert doc["recipe"]["label_smoothing"] == expected and doc["defences"] == ["neg_ls"]
    assert plain.to_dict()["defences"] == []


def test_negative_label_smoothing_default_schedule_is_resolved_and_recorded(checkpoint, private, tmp_path):
    result = _harden(checkpoint, private, tmp_path / "h.pt", epochs=4, neg_ls=-0.05)
    assert result.recipe.to_dict()["label_smoothing"] == {"alpha": -0.05, "start_epoch": 2, "ramp_epochs": 1}
    assert [h["label_smoothing"] for h in result.history] == [0.0, 0.0, -0.05, -0.05]


def _erased(image: torch.Tensor) -> bool:
    """Whether a normalised training image holds a filled rectangle of exact zeros (the erased
    pixels take the normalisation mean; an unerased pixel would need the 8-bit value 127.5)."""
    zero = (image == 0).all(dim=0)
    if not zero.any():
        return False
    rows, cols = zero.any(dim=1).nonzero().flatten(), zero.any(dim=0).nonzero().flatten()
    return bool(zero[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all())


def _trained_batches(monkeypatch, *args, **fields):
    seen: list[torch.Tensor] = []
    original = loop.TrainStep.__call__

    def recording(self, x, y):
        seen.append(x.clone())
        return original(self, x, y)

    monkeypatch.setattr(loop.TrainStep, "__call__", recording)
    result = _harden(*args, **fields)
    monkeypatch.setattr(loop.TrainStep, "__call__", original)
    return torch.cat(seen), result


def test_erasing_reaches_every_training_image_and_the_log(monkeypatch, checkpoint, private, tmp_path):
    plain, _ = _trained_batches(monkeypatch, checkpoint, private, tmp_path / "plain.pt", epochs=1)
    erased, result = _trained_batches(monkeypatch, checkpoint, private, tmp_path / "erase.pt", epochs=1, erase="1.0,0.1,0.8")
    assert not any(_erased(img) for img in plain)
    assert all(_erased(img) for img in erased)  # p = 1: every image the loop trained on
    start = json.loads((tmp_path / "erase.pt.train.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start" and start["recipe"]["erase"] == [1.0, 0.1, 0.8]
    assert _load(tmp_path / "erase.pt").recipe["training"]["erase"] == [1.0, 0.1, 0.8]
    assert result.to_dict()["defences"] == ["erase"]
    half, _ = _trained_batches(monkeypatch, checkpoint, private, tmp_path / "half.pt", epochs=1, erase=0.5)
    share = sum(_erased(img) for img in half) / len(half)
    assert 0.3 < share < 0.7, share  # p alone: that probability, MIDRE's areas


def _frozen_names(checkpoint, stages: int):
    model = _load(checkpoint).model
    plan = plan_freeze(model, torch.zeros(2, *PRE.input_size), stages)
    return model.state_dict(), list(plan.parameters) + list(plan.buffers)


@pytest.mark.parametrize("freeze", [0, 2], ids=["off", "two-stages"])
def test_frozen_stages_stay_bit_identical_to_the_input_checkpoint(checkpoint, private, tmp_path, freeze):
    before, frozen = _frozen_names(checkpoint, 2)
    result = _harden(checkpoint, private, tmp_path / "h.pt", method="rolss", schedule="tts", stage1_epochs=1, epochs=1,
                     lr=3e-3, freeze_stages=freeze)
    after = _load(tmp_path / "h.pt").model.state_dict()
    weights = [n for n in frozen if "num_batches" not in n]
    moved = [n for n in weights if not torch.equal(before[n], after[n])]
    if freeze:
        assert moved == [] and result.recipe.freeze_stages == 2 and result.to_dict()["defences"] == ["freeze_stages"]
        assert _load(tmp_path / "h.pt").recipe["training"]["freeze_stages"] == 2
    else:
        assert len(moved) == len(weights)  # the same layers learn when nothing is frozen


def test_tl_dmi_pretrains_on_public_data_then_keeps_those_stages_frozen(checkpoint, private, public, tmp_path):
    before, frozen = _frozen_names(checkpoint, 2)
    # epochs 0: the model right after public pre-training (deterministic on the CPU), with its new private head
    _harden(checkpoint, private, tmp_path / "pre.pt", public=public, epochs=0, freeze_stages=2, public_epochs=2)
    full = _harden(checkpoint, private, tmp_path / "full.pt", public=public, epochs=2, freeze_stages=2, public_epochs=2)
    pre_w = _load(tmp_path / "pre.pt").model.state_dict()
    full_w = _load(tmp_path / "full.pt").model.state_dict()
    weights = [n for n in frozen if "num_batches" not in n]
    assert all(torch.equal(pre_w[n], full_w[n]) for n in frozen)  # the private run left the public stages alone
    assert all(not torch.equal(before[n], pre_w[n]) for n in weights)  # ... which the public data did train
    later = [n for n in full_w if n not in frozen and n.endswith("weight")]
    assert all(not torch.equal(pre_w[n], full_w[n]) for n in later)  # the rest learned the private data
    record = _load(tmp_path / "full.pt").recipe["training"]["public_pretraining"]
    assert record["epochs"] == 2 and len(record["public_classes"]) == 4 and record["public"] == str(public)
    doc = full.to_dict()
    assert doc["defences"] == ["freeze_stages", "tl_dmi"] and doc["public_pretraining"]["epochs"] == 2
    assert doc["recipe"]["lr"] == 1e-3  # a fresh head: the recipe's rate, not the checkpoint's 1e-4
    assert not (tmp_path / "full.pt.train-state.public").exists()  # superseded by the finished model


@pytest.mark.parametrize(("fields", "public", "words"), [
    ({"neg_ls": -0.05}, None, "`neg_ls` needs training data"),
    ({"erase": 1.0}, None, "`erase` needs training data"),
    ({"freeze_stages": 1}, None, "`freeze_stages` needs training data"),
    ({}, "pub", "`public` needs training data"),
])  # fmt: skip
def test_defences_without_data_are_usage_errors(checkpoint, tmp_path, fields, public, words):
    with pytest.raises(UsageError, match=words):
        harden(checkpoint, config=HardenConfig(**fields), public=public, out=tmp_path / "h.pt", load_options={"arch": ARCH})


@pytest.mark.parametrize(("fields", "public", "words"), [
    ({}, "pub", "`public` pre-trains the early stages for TL-DMI.*`freeze_stages`"),
    ({"public_epochs": 3}, None, "`public_epochs`.*pass `public`"),
])  # fmt: skip
def test_tl_dmi_options_come_together(checkpoint, private, tmp_path, fields, public, words):
    with pytest.raises(UsageError, match=words):
        harden(checkpoint, config=HardenConfig(**fields), data=private, public=public, out=tmp_path / "h.pt",
               load_options={"arch": ARCH})


@pytest.mark.parametrize(("fields", "words"), [
    ({"neg_ls": 0.05}, "`neg_ls` must lie strictly between -1 and 0"),
    ({"neg_ls": -1.0}, "`neg_ls` must lie strictly between -1 and 0"),
    ({"neg_ls_start": 2}, "`neg_ls_start` and `neg_ls_ramp`.*pass `neg_ls`"),
    ({"neg_ls": -0.05, "neg_ls_ramp": -1}, "`neg_ls_ramp` must be a whole number"),
    ({"erase": "1,2"}, "`erase` takes one number P or three"),
    ({"erase": "x"}, "`erase` takes P or P,MIN,MAX as numbers"),
    ({"erase": (1.0, 0.9, 0.2)}, "`erase` areas"),
    ({"erase": 0.0}, "`erase` probability"),
    ({"freeze_stages": -1}, "`freeze_stages` must be a whole number"),
    ({"public_epochs": 0}, "`public_epochs` must be a whole number, 1 or more"),
])  # fmt: skip
def test_bad_defence_values_are_refused_by_the_config(fields, words):
    with pytest.raises(UsageError, match=words):
        HardenConfig(**fields)
