"""`mishield demo`: the stage cache, the table, the figure and the options (fast), and `--quick` end to
end on both embedded datasets (slow: real training, hardening, prior, audit and ONNX export, then a
second run that must come from the cache)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import time
from pathlib import Path

import pytest

from mishield.demo import (
    DATASETS,
    DEFAULT_DATASET,
    SIZES,
    STATE_FILE,
    DemoConfig,
    _some_rows,
    _Stages,
    demo_table,
)

# The end-to-end runs are slow tests (docs/demo.md has their measured times); the rest is fast.


def _demo(out: Path, *extra) -> tuple[int, str, float]:
    """`mishield demo --quick` in-process; (exit code, stdout, seconds)."""
    from mishield.cli import main

    buf = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        try:
            main(["demo", "--quick", "--out", str(out), "--device", "cpu", *extra])
            code = 0
        except SystemExit as exit_:
            code = exit_.code or 0
    return code, buf.getvalue(), time.perf_counter() - t0


@pytest.fixture(scope="module", params=DATASETS)
def quick_run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / request.param
    code, stdout, seconds = _demo(out, "--dataset", request.param, "--json")
    assert code == 0
    return out, json.loads(stdout), seconds


@pytest.mark.slow
def test_quick_demo_end_to_end(quick_run):
    jsonschema = pytest.importorskip("jsonschema")
    from mishield.schemas import load_schema

    out, doc, _ = quick_run
    jsonschema.Draft202012Validator(load_schema("demo")).validate(doc)
    assert set(doc["private_classes"]).isdisjoint(doc["public_classes"])
    assert [s["cached"] for s in doc["stages"]] == [False] * len(doc["stages"])
    rows = doc["rows"]
    size = SIZES[doc["dataset"]]["quick"]
    assert [r["model"] for r in rows] == ["original.pt", *(h[2] for h in size["hardened"])]
    for r in rows:
        lo, hi = r["attack_acc1_ci95"]
        assert 0 <= lo <= r["attack_acc1"] <= hi <= 1 and r["classes"] == len(doc["private_classes"])
        assert r["natural_acc"] is not None and r["knn_dist"] is not None
    assert rows[0]["paired_diff"] is None
    for r in rows[1:]:
        lo, hi = r["paired_diff_ci95"]
        assert lo <= r["paired_diff"] <= hi
        assert r["paired_diff"] == pytest.approx(r["attack_acc1"] - rows[0]["attack_acc1"])
    assert rows[0]["natural_acc"] > 2 / len(doc["private_classes"])  # really trained: well above chance
    report = json.loads(Path(doc["report_json"]).read_text())
    assert len(report["eval_models"]) == len(doc["evaluators"]) == 2  # the worst case of two judges
    assert demo_table(report) == rows  # the table is the report's numbers, nothing else
    assert Path(doc["report_html"]).stat().st_size > 0
    assert all((out / "audit" / m["grid"]).is_file() for m in report["models"])
    onnx = Path(doc["onnx"]["path"])
    assert onnx.is_file() and doc["onnx"]["parity"] is True and doc["onnx"]["max_abs_diff"] <= 1e-4
    assert Path(doc["figure"]).is_file()


def _stage_outputs(out: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every file a stage wrote: an atomic rewrite changes the inode."""
    state = json.loads((out / STATE_FILE).read_text())
    found = {}
    for entry in state.values():
        for name in entry["outputs"]:
            for path in [out / name, *sorted((out / name).rglob("*"))] if (out / name).is_dir() else [out / name]:
                found[str(path.relative_to(out))] = (path.stat().st_ino, path.stat().st_mtime_ns)
    return found


@pytest.mark.slow
def test_quick_omniglot_demo_shows_an_attack_that_worked(quick_run):
    # The newcomer's first run must show something (docs/demo.md, "What --quick measured"): at least
    # 20 attacked classes, a prior the audit does not call weak, trusted evaluators (no warning at
    # all), an attack that reached most of the original's classes and every model's some, and that
    # recovered more than picking the best prior samples (the selection-only baseline) does.
    _, doc, _ = quick_run
    if doc["dataset"] != "omniglot":
        pytest.skip("the Fashion-MNIST --quick run is a smoke run (docs/demo.md)")
    report = json.loads(Path(doc["report_json"]).read_text())
    assert doc["rows"][0]["classes"] >= 20
    assert not report["prior"]["quality"]["weak"] and doc["warnings"] == []
    reached = [sum(c["reached"] for c in m["per_class"]) for m in report["models"]]
    assert reached[0] >= 0.75 * doc["rows"][0]["classes"] and min(reached) > 0, reached
    for m in report["models"]:  # an inconclusive verdict, if any, only for unreached classes
        assert m["verdict"]["status"] != "inconclusive" or m["verdict"].get("cause") == "unreached", m["verdict"]
    original = report["models"][0]["metrics"]
    assert original["attack_acc1"] > original["selection_only_acc1"]


@pytest.mark.slow
def test_second_run_comes_from_the_cache(quick_run, capsys):
    out, doc, _ = quick_run
    before = _stage_outputs(out)
    code, stdout, _ = _demo(out, "--dataset", doc["dataset"], "--json")
    assert code == 0
    again = json.loads(stdout)
    assert all(s["cached"] for s in again["stages"]) and again["rows"] == doc["rows"]
    # Nothing a stage made was redone (rather than "the rerun was fast", a wall-clock comparison
    # that a loaded machine can fail).
    assert _stage_outputs(out) == before and len(before) > 10


@pytest.mark.slow
def test_the_terminal_table_shows_each_verdict_and_the_audits_warnings(quick_run):
    out, doc, _ = quick_run
    report = json.loads(Path(doc["report_json"]).read_text())
    assert [r["verdict"] for r in doc["rows"]] == [m["verdict"]["status"] for m in report["models"]]
    assert doc["warnings"] == report["warnings"]
    code, stdout, _ = _demo(out, "--dataset", doc["dataset"])  # from the cache: the table as a person sees it
    assert code == 0 and "verdict" in stdout
    for r in doc["rows"]:
        assert r["verdict"] in stdout
    for warning in report["warnings"]:
        assert warning[:40] in stdout.replace("\n", " ")


@pytest.mark.slow
def test_a_changed_setting_reruns_that_stage_and_what_depends_on_it(quick_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(quick_run[0], out)
    state = json.loads((out / STATE_FILE).read_text())
    state["prior"]["settings"]["epochs"] = -1  # as if the prior had been trained with other settings
    (out / STATE_FILE).write_text(json.dumps(state))
    code, stdout, _ = _demo(out, "--dataset", quick_run[1]["dataset"], "--json")
    assert code == 0
    ran = {s["name"] for s in json.loads(stdout)["stages"] if not s["cached"]}
    assert ran == {"prior", "audit"}


def test_stage_cache_skips_only_matching_settings_with_outputs_present(tmp_path):
    calls = []

    def work(name):
        def run():
            calls.append(name)
            (tmp_path / f"{name}.out").write_text(name)
            return {"made": name}
        return run

    stages = _Stages(tmp_path, ["a", "b"], {"a": 1, "b": 1}, None)
    assert stages.run("a", {"x": 1}, ["a.out"], work("a")) == {"made": "a"}
    stages.run("b", {"y": 1, **stages.stamp("a")}, ["b.out"], work("b"))
    again = _Stages(tmp_path, ["a", "b"], {}, None)  # a new process reads the state file
    again.run("a", {"x": 1}, ["a.out"], work("a"))
    again.run("b", {"y": 1, **again.stamp("a")}, ["b.out"], work("b"))
    assert calls == ["a", "b"] and [s["cached"] for s in again.ran] == [True, True]
    (tmp_path / "b.out").unlink()  # a missing output reruns its stage
    third = _Stages(tmp_path, ["a", "b"], {}, None)
    third.run("a", {"x": 2}, ["a.out"], work("a"))  # other settings rerun a ...
    third.run("b", {"y": 1, **third.stamp("a")}, ["b.out"], work("b"))  # ... and b, which depends on it
    assert calls == ["a", "b", "a", "b"]


def test_table_intervals_equal_those_of_the_raw_outcomes():
    # Per-class counts are all the class bootstrap and the paired difference use, so rebuilding
    # outcomes from the report's counts must give the intervals of the raw 0/1 array.
    import numpy as np

    from mishield.audit.stats import class_bootstrap, paired_difference

    rng = np.random.default_rng(0)
    raw_a = (rng.random((5, 8)) < [[0.9], [0.6], [0.5], [0.8], [0.2]]).astype(float)
    raw_b = (rng.random((5, 8)) < [[0.4], [0.1], [0.3], [0.2], [0.0]]).astype(float)

    def model(name, raw):
        per_class = [{"class": i, "n": 8, "attack_acc1": float(row.mean())} for i, row in enumerate(raw)]
        return {"name": name, "metrics": {"natural_acc": 0.9, "attack_acc5": 1.0, "knn_dist": 3.0}, "per_class": per_class,
                "delta": {"delta": None}}

    rows = demo_table({"seed": 0, "models": [model("a", raw_a), model("b", raw_b)]})
    ci, paired = class_bootstrap(raw_b), paired_difference(raw_a, raw_b)
    assert rows[1]["attack_acc1_ci95"] == [ci.low, ci.high]
    assert rows[1]["paired_diff_ci95"] == [paired.low, paired.high]
    assert rows[1]["paired_diff"] == pytest.approx(raw_b.mean() - raw_a.mean())


def test_out_that_is_a_file_is_a_usage_error(tmp_path, capsys):
    from clirun import run_cli

    target = tmp_path / "taken"
    target.write_text("not a folder")
    code, out, err = run_cli(["demo", "--quick", "--out", target], capsys)
    assert code == 2 and out == ""
    assert err.strip() == f"error: --out {target} is a file; the demo writes a folder."


def test_time_left_follows_the_measured_pace_of_the_run(tmp_path):
    lines = []
    stages = _Stages(tmp_path, ["a", "b", "c"], {"a": 1, "b": 2, "c": 3}, lines.append)
    assert stages._left("a") == "roughly 6 s left on an idle 2-core CPU"
    stages.ran.append({"name": "a", "cached": False, "seconds": 10.0})  # a ran ten times slower than measured idle
    stages.done["a"] = {}
    assert stages._left("b") == "roughly 50 s left at this machine's pace so far"
    stages.ran.append({"name": "b", "cached": True, "seconds": 0.0})  # cached stages say nothing about the pace
    stages.done["b"] = {}
    assert stages._left("c") == "roughly 30 s left at this machine's pace so far"
    rerun = _Stages(tmp_path, ["a", "b", "c"], {"a": 1, "b": 2, "c": 3}, lines.append)
    rerun.done = {"a": {}, "b": {}, "c": {}}  # an earlier run finished all three; b's settings changed
    assert rerun._left("b") == "roughly 2 s left on an idle 2-core CPU"  # b itself runs again, c stays cached


def test_the_dataset_is_checked_once_in_the_library_and_named_as_the_flag(tmp_path, capsys):
    from clirun import run_cli

    from mishield.errors import UsageError

    with pytest.raises(UsageError, match="`dataset` must be one of omniglot, fashion-mnist"):
        DemoConfig(dataset="mnist")
    code, out, err = run_cli(["demo", "--dataset", "mnist", "--out", tmp_path / "d"], capsys)
    assert code == 2 and out == "" and "--dataset must be one of omniglot, fashion-mnist" in err
    assert not (tmp_path / "d").exists()


def test_the_cli_passes_its_options_in_one_demo_config(monkeypatch, tmp_path, capsys):
    from clirun import run_cli

    import mishield.demo

    seen = {}

    def fake_run_demo(out, *, config, **callbacks):  # wiring only: what reaches the library
        seen.update(out=out, config=config)
        raise mishield.demo.UsageError("stop here")

    monkeypatch.setattr(mishield.demo, "run_demo", fake_run_demo)
    code, _, _ = run_cli(["demo", "--dataset", "fashion-mnist", "--quick", "--out", tmp_path, "--device", "cpu",
                          "--seed", "3"], capsys)
    assert code == 2
    assert seen["config"] == DemoConfig(dataset="fashion-mnist", quick=True, device="cpu", seed=3)
    run_cli(["demo", "--out", tmp_path], capsys)
    assert seen["config"] == DemoConfig() and DemoConfig().dataset == DEFAULT_DATASET == "omniglot"


def test_the_former_keywords_still_work_with_a_warning(tmp_path):
    from mishield.demo import run_demo
    from mishield.errors import UsageError

    taken = tmp_path / "file"
    taken.write_text("x")
    with pytest.warns(DeprecationWarning, match="config=DemoConfig"), pytest.raises(UsageError, match="is a file"):
        run_demo(taken, quick=True, device="cpu")


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("size", ["quick", "full"])
def test_every_demo_judges_with_two_evaluators_of_different_architectures(dataset, size):
    archs = [arch for arch, _ in SIZES[dataset][size]["evaluators"]]
    assert len(archs) == 2 and len(set(archs)) == 2
    assert all(arch != "timm:test_resnet" for arch in archs)  # neither shares the target's architecture


def test_the_figure_shows_evenly_spread_class_rows_of_a_tall_grid():
    from PIL import Image

    rows, height = 129, 36
    grid = Image.new("RGB", (100, rows * height))
    for r in range(rows):  # row r painted with its own grey level
        grid.paste((r, r, r), (0, r * height, 100, (r + 1) * height))
    picked = _some_rows(grid, rows)
    levels = [picked.getpixel((5, j * height + 5))[0] for j in range(picked.height // height)]
    assert levels == [round(i * 128 / 7) for i in range(8)]
    small = Image.new("RGB", (100, 5 * height))
    assert _some_rows(small, 5) is small  # few classes: every row
