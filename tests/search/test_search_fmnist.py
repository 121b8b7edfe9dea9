"""The search end to end at a realistic small size (slow): the embedded Fashion-MNIST subset split as
`mishield demo` splits it (private classes 0-4, public 5-9), timm's test_resnet trained on the
private classes, the quick grid, the prior and the evaluation model trained by the search itself,
the "ci" audit preset. It checks the documents a user reads, not a particular result: at this size
the intervals are tens of points wide (docs/search.md)."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET

import pytest
import torch

import mishield
from mishield.data import load_image_folders, materialize_fashion_mnist
from mishield.hardening import HardenConfig
from mishield.search import SearchConfig
from mishield.search.selection import pick
from mishield.training import RunOptions, TrainingRecipe, fit
from mishield.training.evaluator import EvalModelConfig
from mishield.training.prior import PriorTrainingConfig

pytestmark = pytest.mark.slow
DEVICE = os.environ.get("MISHIELD_TEST_DEVICE", "cpu")
SVG = "{http://www.w3.org/2000/svg}"


def test_search_on_fashion_mnist_writes_a_front_and_an_honest_document(tmp_path):
    private = materialize_fashion_mnist(tmp_path / "private", [0, 1, 2, 3, 4], train_per_class=100, val_per_class=40)
    public = materialize_fashion_mnist(tmp_path / "public", [5, 6, 7, 8, 9], train_per_class=100, val_per_class=1)
    torch.manual_seed(0)
    loaded = mishield.load_model("timm:test_resnet", num_classes=5, input_size=32)
    splits = load_image_folders(private)
    fit(loaded.model, splits, loaded.preprocessing, TrainingRecipe("finetune", epochs=6, lr=3e-3, batch_size=32),
        options=RunOptions(device=DEVICE, workers=0))
    mishield.save_model(tmp_path / "model.pt", loaded.model.eval().cpu(), arch="timm:test_resnet", num_classes=5, surgery=None,
                        preprocessing=loaded.preprocessing, extra={"classes": splits.classes})
    config = SearchConfig(
        base=HardenConfig(epochs=4, lr=1e-3, batch_size=32, device=DEVICE, workers=0), grid="quick", search_epochs=2,
        max_acc_drop=0.05, prior_training=PriorTrainingConfig(resolution=32, latent_dim=32, width=16, epochs=5, batch_size=32),
        eval_training=EvalModelConfig(epochs=8, batch_size=32, lr=3e-3, device=DEVICE, workers=0),
    )
    out = tmp_path / "hardened.pt"
    result = mishield.search_defences(tmp_path / "model.pt", data=private, public=public, out=out, config=config, log=print)
    doc = json.loads(out.with_name("hardened.pt.search.json").read_text())
    print(json.dumps({"baseline": doc["baseline"], "candidates": doc["candidates"], "final": doc["final"],
                      "statements": doc["statements"], "seconds": doc["seconds"]}, indent=1))
    assert len(doc["candidates"]) == 4 and doc["baseline"]["natural_acc"] > 0.6  # a real model, not chance (0.2)
    for row in doc["candidates"]:
        low, high = row["attack_acc1_ci95"]
        assert 0 <= low <= row["attack_acc1"] <= high <= 1 and row["natural_acc_n"] == 200
    chosen = pick(doc["candidates"])
    assert doc["pick"] == (None if chosen is None else chosen["name"]) and result.pick == doc["pick"]
    if chosen is None:
        assert doc["out"] is None and not out.exists() and "No candidate kept natural accuracy" in doc["statements"][0]
    else:
        assert out.is_file() and doc["final"]["epochs"] == 4 and doc["statements"][0].startswith(f"Picked {chosen['name']}")
        significant = "is significantly less leaky" in doc["statements"][1]
        assert significant == chosen["significant"]  # the document says what the interval says, either way
    root = ET.fromstring(out.with_name("hardened.pt.search.svg").read_text())
    names = [g.get("data-name") for g in root.iter(f"{SVG}g")]
    assert names[0] == "original" and set(names) >= {c["name"] for c in doc["candidates"]}
    assert [g.get("data-name") for g in root.iter(f"{SVG}g") if g.get("class") == "model pick"] == (
        [doc["pick"]] if doc["pick"] else [])
