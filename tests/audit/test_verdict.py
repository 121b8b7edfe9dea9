"""The audit's verdict wired end to end: class-bootstrap intervals in report.json, the gate on the
interval's upper end, inconclusive audits failing the gate (exit 4), `--seeds`, the HTML's pictures."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from attack_support import noise_splits

from mishield.audit import judging as judging_module
from mishield.audit import stats
from mishield.audit.loading import NamedModel
from mishield.audit.outcomes import EvaluatorOutcome, ShardOutcome
from mishield.audit.results import PrivacyGate
from mishield.audit.runner import AuditRun
from mishield.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """Three classes of random 16x16 greyscale images and an evaluation model trained 1 epoch on them."""
    from mishield.training.evaluator import train_eval_model

    root = tmp_path_factory.mktemp("verdict")
    noise_splits(root / "data", train=6, val=2)
    evaluation = root / "eval.pt"
    train_eval_model(root / "data", evaluation, arch="attack_support:small_plain_cnn", input_size=16, epochs=1,
                     batch_size=8, device="cpu")  # fmt: skip
    return {"data": root / "data", "eval": evaluation}


def _run(args: list, capsys) -> tuple[int, str, str]:
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    out, err = capsys.readouterr()
    return code, out, err


def _audit(tiny: dict, out: Path, *extra) -> list:
    return [
        "audit", "attack_support:tiny_resnet", "attack_support:tiny_resnet", "--num-classes", "3", "--input-size", "16",
        "--data", tiny["data"], "--out", out, "--device", "cpu", "--eval-model", tiny["eval"],
        "--eval-arch", "attack_support:small_plain_cnn", "--prior", "attack_support:tiny_generator",
        "-S", "12", "-C", "3", "-I", "2", "-K", "2", "-A", "2", "--trust-checkpoint", "--json", *extra,
    ]  # fmt: skip


@pytest.fixture
def without_trust_checks(monkeypatch):
    """These tests pin the gate's logic through the CLI with random-data models, which the trust checks
    (tests/audit/test_trust.py) rightly refuse before any attack; skip those checks here."""
    monkeypatch.setattr(AuditRun, "_trust", lambda run: ([{"accuracy": None}] * len(run.evaluations), [], None))


def test_a_failed_attack_is_inconclusive_and_fails_the_gate(tiny, tmp_path, capsys, without_trust_checks):
    # Untrained 3-class targets: their top-1 barely depends on the input, so the other classes are
    # never ranked first (not reached) and the audit says nothing about privacy; even a 100 %
    # threshold must not pass it.
    code, out, err = _run(_audit(tiny, tmp_path / "a", "--max-attack-acc", "1.0", "--allow-weak-budget"), capsys)
    assert code == 4, err
    assert "inconclusive" in err and "did not reach" in err
    doc = json.loads(out)
    assert doc["gate"]["passed"] is False and doc["gate"]["inconclusive"] == doc["gate"]["failing"]
    assert all(m["verdict"]["status"] == "inconclusive" and m["verdict"]["passed"] is False for m in doc["models"])
    assert all(sum(not row["reached"] for row in m["per_class"]) >= 2 for m in doc["models"])


def test_junit_reports_the_failed_gate_for_ci(tiny, tmp_path, capsys, without_trust_checks):
    import xml.etree.ElementTree as ET

    junit = tmp_path / "ci" / "junit.xml"
    code, out, err = _run(_audit(tiny, tmp_path / "j", "--max-attack-acc", "1.0", "--allow-weak-budget", "--junit", junit), capsys)
    assert code == 4, err  # written before the gate's exit code
    doc = json.loads(out)
    suite = ET.parse(junit).getroot().find("testsuite")
    rows = [(m["name"], row) for m in doc["models"] for row in m["attacks"]]  # one case per model and attack
    assert len(rows) == 4 and {row["attack"] for _, row in rows} == {"ppa", "blackbox"}  # the default attacks
    assert (suite.get("tests"), suite.get("failures")) == ("4", "4")
    cases = suite.findall("testcase")
    assert [(c.get("classname"), c.get("name")) for c in cases] == [(name, row["attack"]) for name, row in rows]
    failures = [case.find("failure") for case in cases]
    assert [f.get("type") for f in failures] == ["inconclusive"] * 4
    assert [f.get("message") for f in failures] == [row["verdict"]["reason"] for _, row in rows]
    code, _, err = _run(_audit(tiny, tmp_path / "k", "--junit", tiny["eval"]), capsys)  # an input is never the report
    assert code == 2 and "is the input" in err, err


def test_report_json_carries_every_number_per_model(tiny, tmp_path, capsys):
    code, out, err = _run(_audit(tiny, tmp_path / "b", "--seeds", "2", "--allow-weak-evaluator", "--attack", "ppa"), capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["options"]["seeds"] == [0, 1]
    first, second = doc["models"]
    for m in doc["models"]:
        s = m["metrics"]
        assert m["budget"]["iterations"] == 2 and m["budget"]["keep"] == 2 and m["budget"]["seeds"] == [0, 1]
        assert s["interval_method"] == stats.METHOD
        iv = s["attack_acc1_interval"]
        assert {"low", "high", "level", "method", "classes", "images", "degenerate", "note"} <= set(iv)
        assert iv["classes"] == 3 and iv["images"] == 3 * 2 * 2  # K = 2 images x 2 seeds, pooled per class
        assert s["attack_acc1_ci95"] == [iv["low"], iv["high"]] and iv["low"] <= s["attack_acc1"] <= iv["high"]
        assert s["attack_acc5_interval"]["images"] == 12
        assert s["chance_acc1"] == pytest.approx(1 / 3) and s["chance_acc5"] == 1.0
        assert s["unfiltered_n"] == 3 * 3 * 2 and 0 <= s["unfiltered_acc1"] <= 1  # every C candidate, both seeds
        assert "evaluator_acc" in s and "selection_only_acc1" in s
        assert m["verdict"]["status"] in ("inconclusive", "not gated")
        assert all(len(row) and 0 <= row["target_confidence"] <= 1 for row in m["per_class"])
    assert first["metrics"]["paired_diff_acc1"] is None
    # Two copies of one architecture with the same seeds: different weights, but the same classes.
    paired = second["metrics"]["paired_diff_acc1_interval"]
    assert paired["method"] and paired["low"] <= second["metrics"]["paired_diff_acc1"] <= paired["high"]
    assert second["metrics"]["paired_diff_acc1"] == pytest.approx(second["metrics"]["attack_acc1"] - first["metrics"]["attack_acc1"])
    page = Path(doc["files"]["html"]).read_text()
    assert '<svg id="attack-chart"' in page and page.count("<rect class=\"bar") == 2
    assert '<div id="side-by-side">' in page and page.count('class="class-row"') == 3
    # per class row: private examples + one strip per model
    assert page.count("data:image/png;base64,") == 3 * (1 + 2) + 1  # + one strip of the prior's samples
    assert 'id="prior-samples"' in page and (Path(doc["files"]["html"]).parent / doc["prior_samples"]).is_file()


def test_the_gate_reads_the_upper_end_of_the_interval(tiny, tmp_path, capsys, monkeypatch, without_trust_checks):
    # Make the untrained targets count as "reached" so that the gate, not the inconclusive rule, decides.
    monkeypatch.setattr(judging_module, "stats_verdict", functools.partial(stats.verdict, min_reached=0.0))
    code, out, err = _run(_audit(tiny, tmp_path / "c", "--attack", "ppa"), capsys)
    assert code == 0, err
    s = json.loads(out)["models"][0]["metrics"]
    est, high = s["attack_acc1"], s["attack_acc1_interval"]["high"]
    assert est < high  # 3 classes x 2 images: the interval is wide
    threshold = round((est + high) / 2, 4)  # above the point estimate, below the upper end
    code, out, err = _run(_audit(tiny, tmp_path / "d", "--max-attack-acc", threshold, "--allow-weak-budget", "--attack", "ppa"), capsys)
    assert code == 4, err
    assert "upper end" in err and "inconclusive" not in err
    doc = json.loads(out)
    assert doc["models"][0]["verdict"]["status"] == "leaky" and doc["gate"]["failing"][0] == doc["models"][0]["name"]


def _parts(*hits: np.ndarray, conf: float = 0.9, so: np.ndarray | None = None, unfiltered: np.ndarray | None = None) -> list[dict]:
    """One rank's part of one (model, attack) run, judged by one evaluator per `hits` array (with the
    selection-only baseline's hits `so` and the unfiltered candidates' `unfiltered`, if given)."""
    n, k = hits[0].shape
    evals = [EvaluatorOutcome(top1=torch.tensor(h, dtype=torch.bool), top5=torch.ones(n, k, dtype=torch.bool), knn=torch.ones(n, k),
                              unfiltered=torch.tensor(h if unfiltered is None else unfiltered, dtype=torch.bool),
                              so_top1=None if so is None else torch.tensor(so, dtype=torch.bool),
                              so_top5=None if so is None else torch.ones(n, k, dtype=torch.bool)) for h in hits]  # fmt: skip
    return [ShardOutcome(classes=list(range(n)), evaluators=evals, target_conf=torch.full((n, k), conf),
                         target_top1=torch.full((n, k), float(conf >= 0.5)), shown=torch.zeros(n, 1, 1, 4, 4, dtype=torch.uint8),
                         image_steps=1, seconds=1.0, timings={})]  # fmt: skip


def _target():
    target = NamedModel("t", torch.nn.Identity(), None, 3)
    target.preprocessing = type("P", (), {"to_dict": lambda self: {}})()
    return target


def _judge(parts_per_model: list[dict], threshold: float, evaluators: int = 1, masking: list | None = None):
    """ModelAudits of models whose attacks (name -> parts) are judged by `evaluators` evaluation models
    (with each model's masking diagnostics, if given); the class count comes from the parts."""
    from mishield.attack.attacks import ATTACKS

    n = len(next(iter(parts_per_model[0].values()))[0].classes)
    judging = judging_module.Judging(threshold, {a: {"iterations": 1} for a in ATTACKS},
                                     [{"name": f"e{i}", "accuracy": None} for i in range(evaluators)],
                                     {a: k.to_dict() for a, k in ATTACKS.items()})  # fmt: skip
    names = [f"m{i}" for i in range(len(parts_per_model))]
    rows = [[judging_module.judge_row(a, parts, list(range(n)), [f"c{c}" for c in range(n)], n, (0.9, 30), judging, f"grids/{mi}_{a}.png")
             for a, parts in attacks.items()] for mi, attacks in enumerate(parts_per_model)]  # fmt: skip
    return judging_module.model_audits([_target()] * len(names), names, rows, masking)


def test_aggregation_gate_paired_difference_and_inconclusive():
    # 3 classes: 2/2, 1/2 and 0/2 hits -> estimate 50 %, wide interval; a 0.6 threshold is above the estimate.
    base = np.array([[1, 1], [1, 0], [0, 0]])
    better = np.array([[1, 0], [0, 0], [0, 0]])
    m0, m1 = _judge([{"ppa": _parts(base)}, {"ppa": _parts(better)}], 0.6)
    assert m0.attack_acc1 == pytest.approx(0.5) and m0.metrics["attack_acc1_interval"]["high"] > 0.6
    assert m0.verdict["status"] == "leaky"  # the point estimate alone would have passed
    assert m1.metrics["paired_diff_acc1"] == pytest.approx(-1 / 3)
    assert m1.metrics["paired_diff_acc1_interval"]["method"] == stats.PAIRED_METHOD
    gate = judging_module.gate([m0, m1], 0.6)
    assert isinstance(gate, PrivacyGate) and not gate.passed and m0.name in gate.failing
    # The same outcomes with the target unconvinced by its own reconstructions: inconclusive.
    (m,) = _judge([{"ppa": _parts(base, conf=0.2)}], 0.6)
    assert m.verdict["status"] == "inconclusive" and "did not reach" in m.verdict["reason"]
    assert judging_module.gate([m], 1.0).inconclusive == ["m0"]


def test_the_most_leaky_evaluator_and_the_worst_attack_decide():
    low = np.array([[1, 0], [0, 0], [0, 0]])
    high = np.array([[1, 1], [1, 1], [1, 0]])
    # Two evaluators of one attack: the row reads the one with the higher upper end, whichever comes first.
    for order in ((low, high), (high, low)):
        (m,) = _judge([{"ppa": _parts(*order)}], 0.5, evaluators=2)
        assert m.attack_acc1 == pytest.approx(5 / 6) and m.metrics["evaluator"] == ("e1" if order[0] is low else "e0")
        assert [e["attack_acc1"] for e in m.metrics["evaluators"]] == pytest.approx([float(o.mean()) for o in order])
    # Two attacks over 5 classes: the weak one passes a 0.7 threshold, the strong one does not; the model is leaky under the strong one.
    weak = np.array([[0, 0], [0, 0], [1, 0], [0, 0], [0, 0]])
    high = np.array([[1, 1], [1, 1], [1, 0], [1, 1], [1, 1]])
    (m,) = _judge([{"ppa": _parts(weak), "lomma": _parts(high)}], 0.7)
    assert [r["verdict"]["status"] for r in m.attacks] == ["passes", "leaky"]
    assert m.attack == m.metrics["strongest_attack"] == "lomma" and m.grid == "grids/0_lomma.png"
    assert m.verdict["status"] == "leaky" and m.verdict["attack"] == "lomma" and "lomma" in m.verdict["reason"]
    assert not judging_module.gate([m], 0.7).passed
    # An attack that failed (target not reached) makes the model inconclusive even when the other passes.
    (m,) = _judge([{"ppa": _parts(weak), "lomma": _parts(weak, conf=0.1)}], 0.7)
    assert m.verdict["status"] == "inconclusive" and m.verdict["attack"] == "lomma"


def test_paired_differences_per_attack_and_worst_case():
    a0, b0 = np.array([[1, 1], [1, 0], [0, 0]]), np.array([[1, 1], [1, 1], [1, 1]])
    a1, b1 = np.array([[0, 0], [0, 0], [0, 0]]), np.array([[1, 1], [1, 0], [1, 0]])
    _, m1 = _judge([{"ppa": _parts(a0), "lomma": _parts(b0)}, {"ppa": _parts(a1), "lomma": _parts(b1)}], 0.5)
    rows = {r["attack"]: r["metrics"]["paired_diff_acc1"] for r in m1.attacks}
    assert rows["ppa"] == pytest.approx(-0.5) and rows["lomma"] == pytest.approx(-1 / 3)  # same attack against same attack
    assert m1.metrics["paired_diff_acc1"] == pytest.approx(-1 / 3)  # worst case (lomma) against worst case (lomma)
    assert m1.delta["attack_acc1"] == pytest.approx(-1 / 3)


def test_without_a_threshold_a_conclusive_audit_is_not_gated_and_a_failed_one_still_inconclusive():
    hot = np.array([[1, 1], [1, 0], [0, 1]])
    iv = stats.class_bootstrap(hot)
    v = stats.verdict(iv, None, chance=1 / 3, reached=np.full(3, 0.9))
    assert v.status == "not gated" and not v.passed
    assert stats.verdict(iv, None, chance=1 / 3, reached=[0.9, 0.1, 0.9]).status == "inconclusive"
