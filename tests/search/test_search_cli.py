"""`mishield harden --search`: every search flag reaches its SearchConfig field, the flags the grid
chooses are refused with --search, and no candidate within the budget exits 4 with no model."""

from __future__ import annotations

import pytest
from clirun import run_cli

from mishield.search import runner
from mishield.search.results import SearchResult

STOP = 99


@pytest.fixture
def captured(monkeypatch):
    seen = {}

    def fake(*args, **kwargs):
        seen.update(kwargs, args=args)
        raise SystemExit(STOP)

    monkeypatch.setattr(runner, "search_defences", fake)
    return seen


def test_every_search_flag_reaches_its_field(captured, capsys, tmp_path):
    code, _, err = run_cli(["harden", "m.pt", "--out", tmp_path / "h.pt", "--data", tmp_path / "d", "--public", tmp_path / "p",
                            "--search", "--max-acc-drop", "0.03", "--search-epochs", "3", "--grid", "quick",
                            "--search-preset", "default", "--prior", "p.safetensors", "--eval-model", "e1.pt", "--eval-model",
                            "e2.pt", "--eval-arch", "x.y:z", "--allow-weak-evaluator", "--no-remeasure", "--epochs", "7", "--lr", "0.01",
                            "--batch-size", "16", "--bido", "--seed", "3", "--device", "cpu", "--workers", "1", "--overwrite",
                            "--schedule", "tts", "--stage1-epochs", "1", "--arch", "timm:test_resnet", "--num-classes", "3"],
                           capsys)  # fmt: skip
    assert code == STOP, err
    c = captured["config"]
    assert (c.max_acc_drop, c.search_epochs, c.grid, c.remeasure, c.overwrite) == (0.03, 3, "quick", False, True)
    assert c.audit.attack.preset == "default" and c.audit.allow_weak_evaluator and c.audit.attack.seed == 3 and c.audit.device == "cpu"
    assert c.audit.eval_arch == "x.y:z"
    b = c.base
    assert (b.epochs, b.lr, b.batch_size, b.bido, b.seed, b.device, b.workers, b.schedule, b.stage1_epochs, b.method) == \
        (7, 0.01, 16, True, 3, "cpu", 1, "tts", 1, "rolss")
    assert not b.overwrite and not b.resume and b.neg_ls is None and b.erase is None
    assert captured["prior"] == "p.safetensors" and captured["eval_model"] == ["e1.pt", "e2.pt"]
    assert captured["public"] == tmp_path / "p" and captured["data"] == tmp_path / "d"
    assert c.load_options["arch"] == "timm:test_resnet" and c.load_options["num_classes"] == 3


def test_search_defaults(captured, capsys, tmp_path):
    code, _, err = run_cli(["harden", "m.pt", "--out", tmp_path / "h.pt", "--data", tmp_path, "--public", tmp_path, "--search"], capsys)
    assert code == STOP, err
    c = captured["config"]
    assert (c.max_acc_drop, c.search_epochs, c.grid, c.remeasure, c.audit.attack.preset) == (0.02, 2, "default", True, "ci")
    assert captured["prior"] is None and captured["eval_model"] is None


@pytest.mark.parametrize(("flags", "words"), [
    (["--search", "--method", "ssf"], "--method cannot be combined with --search"),
    (["--search", "--neg-ls", "-0.05"], "--neg-ls cannot be combined with --search"),
    (["--search", "--erase", "1.0"], "--erase cannot be combined with --search"),
    (["--search", "--freeze-stages", "1"], "--freeze-stages cannot be combined with --search"),
    (["--search", "--resume"], "--resume cannot be combined with --search"),
    (["--max-acc-drop", "0.05"], "--max-acc-drop is an option of the defence search; add --search"),
    (["--grid", "quick"], "--grid is an option of the defence search"),
])  # fmt: skip
def test_flags_the_grid_chooses_and_search_flags_alone_are_usage_errors(captured, capsys, tmp_path, flags, words):
    code, out, err = run_cli(["harden", "m.pt", "--out", tmp_path / "h.pt", "--data", tmp_path, "--public", tmp_path, *flags], capsys)
    assert code == 2 and words in err and out == "", err


def test_a_recipe_that_sets_a_defence_is_refused_with_search(captured, capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("neg_ls: -0.05\nepochs: 3\n")
    code, _, err = run_cli(["harden", "m.pt", "--out", tmp_path / "h.pt", "--data", tmp_path, "--public", tmp_path, "--search",
                            "--recipe", recipe], capsys)
    assert code == 2 and "the --recipe file sets neg_ls" in err, err


def test_no_candidate_within_the_budget_exits_4_and_writes_no_model(monkeypatch, capsys, tmp_path):
    def none_within(*args, **kwargs):
        row = {"name": "rolss", "natural_acc": 0.5, "accuracy_drop": 0.4, "within_budget": False, "attack_acc1": 0.2,
               "attack_acc1_ci95": [0.1, 0.3], "paired_diff_acc1": -0.1, "paired_diff_acc1_ci95": [-0.2, 0.0], "train_seconds": 1.0}
        return SearchResult(model="m.pt", out=None, files={"json": "h.pt.search.json", "svg": "h.pt.search.svg"}, options={},
                            baseline={"name": "m.pt", "natural_acc": 0.9, "attack_acc1": 0.3, "attack_acc1_ci95": [0.2, 0.4]},
                            candidates=[row], pick=None, statements=["No candidate kept natural accuracy within the budget."],
                            selection_rule="")

    monkeypatch.setattr(runner, "search_defences", none_within)
    code, out, err = run_cli(["harden", "m.pt", "--out", tmp_path / "h.pt", "--data", tmp_path, "--public", tmp_path, "--search"], capsys)
    assert code == 4 and "no candidate kept natural accuracy within --max-acc-drop 0.02" in err and out == "", err
    assert "No candidate kept natural accuracy within the budget." in err
