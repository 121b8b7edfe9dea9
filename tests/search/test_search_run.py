"""`mishield.search_defences` end to end at test size: tiny ResNet, embedded Fashion-MNIST images,
a two-candidate grid, one-epoch fine-tunings and the smallest attack budget. The numbers are
meaningless at this size; what is pinned is the protocol (one audit, the original first, the
selection rule applied to what was measured, the pick written and re-measured, every output
checked first) and that an interrupted search continues where it stopped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from attack_support import tiny_resnet

import mishield
from mishield.audit.config import AuditConfig
from mishield.data import load_image_folders, materialize_fashion_mnist
from mishield.errors import UsageError
from mishield.hardening import HardenConfig
from mishield.models import load_model, save_model
from mishield.preprocessing import Preprocessing
from mishield.search import Candidate, SearchConfig
from mishield.search.selection import pick
from mishield.training import (
    RunOptions,
    TrainingInterrupted,
    TrainingPreempted,
    TrainingRecipe,
    fit,
    loop,
)
from mishield.training.evaluator import EvalModelConfig, train_eval_model
from mishield.training.prior import PriorTrainingConfig, train_prior

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema (dev extra) validates the documents")

ARCH = "attack_support:tiny_resnet"
EVAL_ARCH = "attack_support:small_plain_cnn"
PRE = Preprocessing((3, 16, 16), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
GRID = (Candidate("rolss"), Candidate("ssf", 0.2, -0.05, (1.0, 0.1, 0.8)))
TINY_PRIOR = PriorTrainingConfig(resolution=32, latent_dim=8, width=4, epochs=1, batch_size=16)
TINY_EVAL = EvalModelConfig(arch=EVAL_ARCH, input_size=16, epochs=2, batch_size=32, device="cpu", workers=0)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Private classes 0, 1, 7 and public 5, 6, 8 (class-disjoint), a trained checkpoint, a prior and an evaluator."""
    root = tmp_path_factory.mktemp("search")
    private = materialize_fashion_mnist(root / "private", [0, 1, 7], train_per_class=40, val_per_class=15)
    public = materialize_fashion_mnist(root / "public", [5, 6, 8], train_per_class=30, val_per_class=1)
    torch.manual_seed(0)
    model, splits = tiny_resnet(3), load_image_folders(private)
    fit(model, splits, PRE, TrainingRecipe("finetune", epochs=3, lr=3e-3, batch_size=32), options=RunOptions(device="cpu", workers=0))
    save_model(root / "model.pt", model.eval(), arch=ARCH, num_classes=3, surgery=None, preprocessing=PRE,
               extra={"classes": splits.classes})
    prior = train_prior(public, root / "prior.safetensors", TINY_PRIOR, device="cpu")
    train_eval_model(private, root / "eval.pt", config=TINY_EVAL, prior=prior)
    return {"root": root, "private": private, "public": public, "model": root / "model.pt", "prior": prior, "eval": root / "eval.pt"}


def _config(**changes) -> SearchConfig:
    audit = AuditConfig.preset("ci", samples=16, candidates=2, iterations=2, keep=2, final_augmentations=2, batch_size=16,
                               allow_weak_evaluator=True, device="cpu", eval_arch=EVAL_ARCH)
    fields = {"base": HardenConfig(batch_size=32, lr=3e-3, epochs=2, device="cpu", workers=0), "grid": GRID, "search_epochs": 1,
              "max_acc_drop": 0.5, "audit": audit, "prior_training": TINY_PRIOR, "eval_training": TINY_EVAL,
              "load_options": {"arch": ARCH}}
    return SearchConfig(**{**fields, **changes})


def _search(world, out: Path, given: bool = True, log: list | None = None, **changes):
    parts = {"prior": world["prior"], "eval_model": world["eval"]} if given else {"public": world["public"]}
    return mishield.search_defences(world["model"], data=world["private"], out=out, config=_config(**changes),
                                    log=None if log is None else log.append, **parts)


def _valid(doc: dict) -> dict:
    from mishield.schemas import load_schema

    validator = jsonschema.Draft202012Validator(load_schema("harden-search"))
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    assert not errors, errors
    return doc


def test_a_tiny_search_trains_audits_once_picks_by_the_rule_and_writes_everything(world, tmp_path):
    out = tmp_path / "hardened.pt"
    said: list[str] = []
    result = _search(world, out, given=False, log=said)  # the prior and the evaluator trained by the search itself
    doc = _valid(json.loads(out.with_name("hardened.pt.search.json").read_text()))
    assert doc == json.loads(json.dumps(result.to_dict()))
    # ONE audit of the original and every candidate, the original first (the paired baseline)
    report = json.loads(Path(doc["files"]["audit_report"]).read_text())
    assert [m["name"] for m in report["models"]] == ["model.pt", "00-rolss.pt", "01-ssf-0.2+neg-ls+erase.pt"]
    assert report["models"][0]["metrics"]["paired_diff_acc1"] is None
    assert report["models"][0]["defences"] is None  # the original's file records no mishield training
    assert report["models"][1]["defences"] == {}  # RoLSS alone
    assert set(report["models"][2]["defences"]) == {"label_smoothing", "erase"}  # report.json describes each model's defences
    assert [c["name"] for c in doc["candidates"]] == [c.name for c in GRID]
    for row, model in zip(doc["candidates"], report["models"][1:]):
        assert row["attack_acc1"] == model["metrics"]["attack_acc1"]
        assert row["attack_acc1_ci95"] == [model["metrics"]["attack_acc1_interval"][k] for k in ("low", "high")]
        assert row["paired_diff_acc1"] == model["metrics"]["paired_diff_acc1"]
        assert row["accuracy_drop"] == pytest.approx(report["models"][0]["metrics"]["natural_acc"] - model["metrics"]["natural_acc"])
        assert row["recipe"]["training"]["epochs"] == 1 and row["train_seconds"] > 0
    assert doc["candidates"][1]["recipe"]["training"]["erase"] == [1.0, 0.1, 0.8]
    assert doc["candidates"][1]["recipe"]["training"]["label_smoothing"]["alpha"] == -0.05
    assert doc["pick"] == pick(doc["candidates"])["name"]  # the documented rule on the measured rows
    # the pick, fully fine-tuned from the original into OUT, and re-measured
    chosen = next(c for c in GRID if c.name == doc["pick"])
    recorded = load_model(out, arch=ARCH).recipe
    assert recorded["surgery"][-1]["method"] == chosen.method and recorded["training"]["epochs"] == 2
    assert recorded["training"].get("erase") == (None if chosen.erase is None else list(chosen.erase))
    final_report = json.loads(Path(doc["files"]["final_audit_report"]).read_text())
    assert [m["name"] for m in final_report["models"]] == ["model.pt", "hardened.pt"]
    assert doc["final"]["attack_acc1"] == final_report["models"][1]["metrics"]["attack_acc1"]
    assert any(s.startswith(f"Picked {doc['pick']}") for s in doc["statements"])
    assert out.with_name("hardened.pt.search.svg").read_text().startswith("<svg")
    assert (tmp_path / "hardened.pt.search.d" / "prior.safetensors").is_file() and doc["resumed"] is False
    assert any(line.startswith("candidate 2/2 ssf-0.2+neg-ls+erase") for line in said)


def _interrupt_at(monkeypatch, calls: int, error: type[BaseException]):
    """Raise `error` inside the training step on its `calls`-th call."""
    original, seen = loop.TrainStep.__call__, []

    def step(self, x, y):
        seen.append(1)
        if len(seen) == calls:
            raise error
        return original(self, x, y)

    monkeypatch.setattr(loop.TrainStep, "__call__", step)


def test_ctrl_c_in_a_candidate_stops_with_130_and_a_rerun_continues(world, tmp_path, monkeypatch):
    out = tmp_path / "h.pt"
    # 3 steps per epoch, 2 epochs each: candidate 1 finishes, candidate 2 is stopped in its second epoch
    _interrupt_at(monkeypatch, 11, KeyboardInterrupt)
    with pytest.raises(TrainingInterrupted, match="rerun the same command to continue") as info:
        _search(world, out, search_epochs=2)
    assert info.value.exit_code == 130 and not isinstance(info.value, TrainingPreempted)
    first, second = (tmp_path / "h.pt.search.d" / "candidates" / name for name in ("00-rolss.pt", "01-ssf-0.2+neg-ls+erase.pt"))
    assert first.is_file() and not second.exists() and second.with_name(second.name + ".train-state").is_file()
    stamp = first.stat().st_mtime_ns
    monkeypatch.undo()
    said: list[str] = []
    result = _search(world, out, log=said, search_epochs=2)
    assert first.stat().st_mtime_ns == stamp and "candidate 1/2 rolss: done earlier (00-rolss.pt)" in said
    events = [json.loads(line)["event"] for line in second.with_name(second.name + ".train.jsonl").read_text().splitlines()]
    assert "resume" in events  # the interrupted candidate continued from its first epoch
    assert result.resumed and result.out == out and out.is_file()


def test_sigterm_during_the_audit_stops_with_143_and_the_rerun_keeps_the_candidates(world, tmp_path, monkeypatch):
    from mishield.attack import engine
    from mishield.training.interrupt import Preempted

    out = tmp_path / "h.pt"

    def preempted(*args, **kwargs):
        raise Preempted

    monkeypatch.setattr(engine.InversionAttack, "run", preempted)
    with pytest.raises(TrainingPreempted, match="stopped by SIGTERM") as info:
        _search(world, out)
    assert info.value.exit_code == 143
    monkeypatch.undo()
    said: list[str] = []
    _search(world, out, log=said)
    assert all("done earlier" in line for line in said if line.startswith("candidate"))
    assert (tmp_path / "h.pt.search.json").is_file()


def test_a_rerun_with_other_options_is_refused_and_overwrite_starts_over(world, tmp_path, monkeypatch):
    out = tmp_path / "h.pt"
    _interrupt_at(monkeypatch, 2, KeyboardInterrupt)
    with pytest.raises(TrainingInterrupted):
        _search(world, out)
    monkeypatch.undo()
    with pytest.raises(UsageError, match="holds a search with other inputs or options"):
        _search(world, out, search_epochs=2)
    result = _search(world, out, search_epochs=2, max_acc_drop=0.4, overwrite=True)
    assert result.options["search_epochs"] == 2 and not result.resumed
    with pytest.raises(UsageError, match="already exists"):  # a finished search is not redone by accident
        _search(world, out, search_epochs=2)


def test_every_output_is_checked_against_every_input_before_any_work(world, tmp_path):
    (tmp_path / "h.pt.search.svg").write_text("mine")
    with pytest.raises(UsageError, match="h.pt.search.svg already exists"):
        _search(world, tmp_path / "h.pt")
    assert not (tmp_path / "h.pt.search.d").exists()  # refused before anything was written
    with pytest.raises(UsageError, match="inside the input folder"):
        _search(world, world["private"] / "h.pt")
    linked = tmp_path / "y.pt.search.json"  # OUT.search.json would replace the evaluation model given as input
    linked.symlink_to(world["eval"])
    with pytest.raises(UsageError, match="is the input"):
        mishield.search_defences(world["model"], data=world["private"], prior=world["prior"], eval_model=linked,
                                 out=tmp_path / "y.pt", config=_config(overwrite=True))
    assert not (tmp_path / "y.pt.search.d").exists()


def test_an_untrained_spec_and_a_missing_prior_are_refused(world, tmp_path):
    with pytest.raises(UsageError, match="untrained architecture spec"):
        mishield.search_defences(ARCH, data=world["private"], prior="none", eval_model=world["eval"], out=tmp_path / "h.pt",
                                 config=_config(load_options={"num_classes": 3, "input_size": 16}))
    with pytest.raises(UsageError, match="needs an image prior"):
        mishield.search_defences(world["model"], data=world["private"], out=tmp_path / "h.pt", config=_config())


def test_the_command_line_search_prints_one_valid_document(world, tmp_path, capsys):
    from clirun import run_cli

    out = tmp_path / "h.pt"
    code, stdout, err = run_cli(["harden", str(world["model"]), "--arch", ARCH, "--data", str(world["private"]), "--search",
                                 "--prior", str(world["prior"]), "--eval-model", str(world["eval"]), "--eval-arch", EVAL_ARCH, "--grid", "quick",
                                 "--search-epochs", "1", "--epochs", "1", "--max-acc-drop", "0.5", "--lr", "0.003",
                                 "--batch-size", "32", "--device", "cpu", "--workers", "0", "--allow-weak-evaluator",
                                 "--no-remeasure", "--out", str(out), "--json"], capsys)
    assert code == 0, err
    doc = _valid(json.loads(stdout))
    assert len(doc["candidates"]) == 4 and doc["final"] is None and out.is_file()
    assert "candidate 4/4 ssf-0.2+neg-ls+erase" in err and "not audited again" in doc["statements"][-1]
