"""The privacy gate's result as a JUnit XML test report (`mishield audit --junit FILE`), the format
CI systems (GitLab, Jenkins, GitHub Actions' test reporters, Azure) show natively.

One test case per audited model and attack (`classname` the model, `name` the attack): it passes
when its verdict passes, fails with the verdict's reason when the model is leaky or the audit is
inconclusive (an inconclusive audit is never evidence of privacy, docs/audit.md), and is skipped,
with the reason, when no gate was set (the interval is then the result, not a pass). The figures
a reader needs to judge (attack accuracy @1 and its interval, chance, the threshold) are each
case's system-out; the audit's warnings are the suite's system-err.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from mishield.audit.results import AuditReport
from mishield.fileio import atomic_output

__all__ = ["junit_xml", "write_junit"]


def _cases(report: AuditReport) -> list[tuple[str, dict]]:
    """(model, row) for every model and every attack it was judged by; a row holds the attack, its
    metrics, verdict and timing (report.json's `models[].attacks[]`)."""
    cases = []
    for m in report.models:
        rows = m.attacks or [{"attack": m.attack, "metrics": m.metrics, "verdict": m.verdict, "timing": m.timing}]
        cases += [(m.name, row) for row in rows]
    return cases


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f} %"


def _figures(metrics: dict, verdict: dict, threshold: float | None) -> str:
    interval = metrics.get("attack_acc1_interval") or {}
    return (f"attack accuracy @1 {_pct(metrics.get('attack_acc1'))} (95 % interval {_pct(interval.get('low'))} to "
            f"{_pct(interval.get('high'))}), chance {_pct(metrics.get('chance_acc1'))}, natural accuracy "
            f"{_pct(metrics.get('natural_acc'))}, threshold {_pct(threshold)}; verdict {verdict.get('status', '-')}: "
            f"{verdict.get('reason', '')}")


def junit_xml(report: AuditReport) -> str:
    """The JUnit XML document of `report`'s verdicts (see the module doc)."""
    threshold = None if report.gate is None else report.gate.max_attack_acc
    suite = ET.Element("testsuite", name="mishield audit", timestamp=report.created or "")
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for model, row in _cases(report):
        metrics, verdict = row.get("metrics") or {}, row.get("verdict") or {}
        seconds = (row.get("timing") or {}).get("seconds") or 0.0
        case = ET.SubElement(suite, "testcase", classname=model, name=row.get("attack") or "ppa", time=f"{float(seconds):.3f}")
        status, reason = verdict.get("status", ""), verdict.get("reason", "")
        counts["tests"] += 1
        if status == "passes":
            pass
        elif status == "not gated":
            ET.SubElement(case, "skipped", message=reason)
            counts["skipped"] += 1
        else:  # leaky, inconclusive, or no verdict at all: never a pass
            failure = ET.SubElement(case, "failure", message=reason or "the audit reached no verdict", type=status or "no verdict")
            failure.text = reason
            counts["failures"] += 1
        ET.SubElement(case, "system-out").text = _figures(metrics, verdict, threshold)
    for key, value in counts.items():
        suite.set(key, str(value))
    if report.warnings:
        ET.SubElement(suite, "system-err").text = "\n".join(f"warning: {w}" for w in report.warnings)
    suites = ET.Element("testsuites", name="mishield", **{k: suite.get(k) for k in ("tests", "failures", "errors", "skipped")})
    suites.append(suite)
    ET.indent(suites)
    return ET.tostring(suites, encoding="unicode", xml_declaration=True) + "\n"


def write_junit(report: AuditReport, path: str | Path, overwrite: bool = False) -> Path:
    """Write `junit_xml(report)` to `path` atomically (`mishield.fileio.atomic_output`)."""
    path = Path(path)
    with atomic_output(path, overwrite) as tmp:
        tmp.write_text(junit_xml(report), encoding="utf-8")
    return path
