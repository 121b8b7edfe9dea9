"""`mishield audit --junit FILE`: the gate's result as a JUnit XML test report (`mishield.audit.junit`):
one test case per model and attack, a failure carrying the verdict's reason for a leaky model and
for an inconclusive audit, a skip without a gate, counts that match, valid XML."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from mishield.audit.junit import junit_xml, write_junit
from mishield.audit.results import AuditReport, ModelAudit, PrivacyGate
from mishield.errors import UsageError

PASSES = {"status": "passes", "passed": True, "reason": "the upper end 20.0 % is at or below 30.0 %.", "cause": "passes"}
LEAKY = {"status": "leaky", "passed": False, "reason": "the upper end 80.0 % exceeds 30.0 %.", "cause": "leaky"}
INCONCLUSIVE = {"status": "inconclusive", "passed": False, "cause": "unreached",
                "reason": "the attack did not reach the target's class in 2 of the audited classes."}
NOT_GATED = {"status": "not gated", "passed": False, "cause": "not_gated", "reason": "no threshold was given."}
METRICS = {"attack_acc1": 0.1, "attack_acc1_interval": {"low": 0.05, "high": 0.2}, "chance_acc1": 0.1, "natural_acc": 0.9}


def _report(*verdicts, gate: float | None = 0.3, attacks: tuple[str, ...] = ()) -> AuditReport:
    models = []
    for i, v in enumerate(verdicts):
        rows = [{"attack": a, "metrics": METRICS, "verdict": v, "timing": {"seconds": 2.5}} for a in attacks]
        models.append(ModelAudit(name=f"model{i}.pt", metrics=METRICS, verdict=v, attack=attacks[0] if attacks else "ppa",
                                 attacks=rows, timing={"seconds": 1.0}))
    failing = [m.name for m in models if not m.verdict["passed"]]
    inconclusive = [m.name for m in models if m.verdict["status"] == "inconclusive"]
    privacy = None if gate is None else PrivacyGate(gate, not failing, failing, inconclusive, {m.name: m.verdict["reason"] for m in models})
    return AuditReport(models=models, classes=[0, 1], options={}, prior={}, eval_model={}, gate=privacy,
                       warnings=["the prior looks too weak <for> a meaningful audit"], created="2025-01-01T00:00:00+00:00")


def _parse(text: str) -> ET.Element:
    root = ET.fromstring(text.encode())
    assert root.tag == "testsuites" and len(root) == 1
    return root[0]


def test_one_case_per_model_failing_with_the_verdicts_reason():
    suite = _parse(junit_xml(_report(PASSES, LEAKY, INCONCLUSIVE)))
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors"), suite.get("skipped")) == ("3", "2", "0", "0")
    cases = suite.findall("testcase")
    assert [(c.get("classname"), c.get("name")) for c in cases] == [("model0.pt", "ppa"), ("model1.pt", "ppa"), ("model2.pt", "ppa")]
    assert cases[0].find("failure") is None and cases[0].find("skipped") is None
    leaky, inconclusive = cases[1].find("failure"), cases[2].find("failure")
    assert leaky.get("message") == LEAKY["reason"] and leaky.get("type") == "leaky"
    assert inconclusive.get("message") == INCONCLUSIVE["reason"] and inconclusive.get("type") == "inconclusive"
    assert "20.0 %" in cases[0].find("system-out").text and "threshold 30.0 %" in cases[0].find("system-out").text
    assert "too weak <for>" in suite.find("system-err").text  # escaped in the file, read back intact


def test_every_attack_is_a_case_and_models_that_pass_are_reported_too():
    suite = _parse(junit_xml(_report(PASSES, PASSES, attacks=("ppa", "lomma"))))
    assert (suite.get("tests"), suite.get("failures")) == ("4", "0")
    assert [c.get("name") for c in suite.findall("testcase")] == ["ppa", "lomma", "ppa", "lomma"]
    assert all(c.get("time") == "2.500" for c in suite.findall("testcase"))


def test_without_a_gate_conclusive_cases_are_skipped_never_passed():
    suite = _parse(junit_xml(_report(NOT_GATED, INCONCLUSIVE, gate=None)))
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("2", "1", "1")
    assert suite.findall("testcase")[0].find("skipped").get("message") == NOT_GATED["reason"]


def test_the_file_is_written_atomically_and_not_replaced_without_overwrite(tmp_path):
    path = write_junit(_report(LEAKY), tmp_path / "ci" / "junit.xml")
    assert _parse(path.read_text()).get("failures") == "1"
    with pytest.raises(UsageError, match="--overwrite"):
        write_junit(_report(PASSES), path)
    write_junit(_report(PASSES), path, overwrite=True)
    assert _parse(path.read_text()).get("failures") == "0" and [p.name for p in path.parent.iterdir()] == ["junit.xml"]
