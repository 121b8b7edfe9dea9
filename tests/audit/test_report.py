"""The report files: versioned JSON, a self-contained HTML page, PNG grids; refusal to overwrite."""

from __future__ import annotations

import json
import re

import pytest
import torch

from mishield.audit.report import (
    SCHEMA,
    SCHEMA_VERSION,
    check_outputs,
    class_row,
    real_images,
    render_html,
    summary_table,
    write_report,
)
from mishield.audit.results import AuditReport, ModelAudit, PrivacyGate
from mishield.errors import BadInputError, UsageError


def _report() -> AuditReport:
    per_class = [{"class": c, "name": f"c{c}", "n": 4, "attack_acc1": 0.25 * c, "attack_acc5": 1.0, "knn_dist": 1.5, "target_confidence": 0.9} for c in range(3)]
    metrics = {"natural_acc": 0.9, "natural_acc_n": 30, "n": 12, "attack_acc1": 0.25, "attack_acc1_ci95": [0.1, 0.5], "attack_acc5": 1.0, "knn_dist": 1.5}
    model = {"name": "base <b>", "metrics": metrics, "per_class": per_class, "grid": "grids/0_base.png", "delta": None}
    other = {**model, "name": "hardened", "grid": "grids/1_hardened.png",
             "delta": {"natural_acc": -0.01, "attack_acc1": -0.1, "attack_acc5": 0.0, "knn_dist": 0.2, "delta": 10.0}}  # fmt: skip
    return AuditReport.from_dict({
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "classes": [0, 1, 2], "seed": 0,
        "options": {"samples": 8, "candidates": 4, "iterations": 2, "keep": 4, "final_augmentations": 2, "seed": 0},
        "prior": {"kind": "generator", "source": "prior.safetensors"}, "eval_model": {"source": "eval.pt"},
        "models": [model, other], "gate": {"max_attack_acc": 0.2, "passed": False, "failing": ["base <b>", "hardened"]},
    })  # fmt: skip


def test_writes_json_html_and_grids(tmp_path):
    report = _report()
    recon = torch.randint(0, 255, (8, 1, 16, 16), dtype=torch.uint8)
    shown = {m.grid: {c: recon for c in range(3)} for m in report.models}
    written = write_report(tmp_path, report, shown, {c: recon[:2] for c in range(3)})
    parsed = json.loads((tmp_path / "report.json").read_text())
    assert parsed["schema"] == SCHEMA and parsed["schema_version"] == 2 and parsed["models"][1]["delta"]["delta"] == 10.0
    from PIL import Image

    with Image.open(tmp_path / "grids" / "0_base.png") as grid:
        assert grid.size[1] == 3 * (16 + 4)  # one strip per class
    page = (tmp_path / "report.html").read_text()
    # self-contained: every image is inline, nothing is fetched
    assert not re.search(r"(src|href)=(?!['\"]?data:)", page)
    # side by side: per class the private examples, then one strip per model
    assert page.count("data:image/png;base64,") == 3 * (1 + 2) and page.count('class="class-row"') == 3
    assert '<svg id="attack-chart"' in page and page.count('<rect class="bar') == 2
    assert "base &lt;b&gt;" in page and "FAILED" in page and "upper end" in page
    assert set(written) == {"grid0", "grid1", "html", "json"}
    with pytest.raises(UsageError, match="--overwrite"):
        check_outputs(tmp_path, overwrite=False)
    check_outputs(tmp_path, overwrite=True)


def test_html_and_terminal_table_show_missing_numbers_as_dashes():
    report = _report()
    report.models[0].metrics["natural_acc"] = None
    report.models[0].metrics["knn_dist"] = None
    assert "–" in render_html(report, {}, {})
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(summary_table(report))
    text = console.export_text()
    assert "base <b>" in text and "25.0" in text and "–" in text


def test_class_row_tiles_reconstructions_a_gap_and_private_images():
    recon = torch.full((3, 1, 8, 8), 7, dtype=torch.uint8)
    real = torch.full((2, 1, 8, 8), 99, dtype=torch.uint8)
    row = class_row(recon, real, pad=2)
    assert row.shape == (8 + 4, 6 * (8 + 2) + 2, 1)  # 3 reconstructions + blank + 2 private, make_grid's padding
    assert row[2, 2, 0] == 7 and row[2, 2 + 3 * 10, 0] == 255 and row[2, 2 + 4 * 10, 0] == 99


def test_bar_chart_places_the_interval_and_the_threshold():
    from mishield.audit.report import bar_chart

    report = _report()
    report.models[0].metrics = {**report.models[0].metrics, "attack_acc1_interval": {"low": 0.1, "high": 0.5}}
    chart = bar_chart(report, width=600)
    left, span = 200, 600 - 200 - 240  # the chart's margins: labels on the left, whisker labels on the right
    r = chart["rows"][0]
    assert r["w"] == pytest.approx(0.25 * span) and r["lo"] == pytest.approx(left + 0.1 * span) and r["hi"] == pytest.approx(left + 0.5 * span)
    assert chart["rows"][1]["hi"] == pytest.approx(left + 0.5 * span)  # read from the bare ci95 pair [0.1, 0.5]
    assert [line["cls"] for line in chart["lines"]] == ["threshold"]
    assert chart["lines"][0]["x"] == pytest.approx(left + 0.2 * span)


def test_real_images_match_the_reconstructions_size_and_channels(tmp_path):
    from PIL import Image

    (tmp_path / "x").mkdir()
    Image.new("RGB", (28, 20), (10, 200, 30)).save(tmp_path / "x" / "a.png")
    items = [(tmp_path / "x" / "a.png", 0), (tmp_path / "x" / "a.png", 1)]
    grey = real_images(items, 1, (1, 16, 16))
    colour = real_images(items, 0, (3, 8, 8))
    assert grey.shape == (1, 1, 16, 16) and colour.shape == (1, 3, 8, 8)
    assert colour[0, :, 4, 4].tolist() == [10, 200, 30]


def test_report_object_round_trips_through_the_json_layout():
    report = _report()
    report.models[1].metrics["knn_dist"] = float("nan")  # JSON has no NaN: written as null
    doc = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert list(doc) == ["schema", "schema_version", "created", "mishield_version", "options", "seed", "classes",
                         "data", "prior", "eval_model", "eval_models", "prior_samples", "feature_extractors", "models", "gate",
                         "warnings"]
    assert list(doc["models"][0]) == ["name", "num_classes", "preprocessing", "metrics", "per_class", "grid",
                                      "timing", "delta", "budget", "verdict", "attack", "attacks", "masking"]
    assert doc["models"][1]["metrics"]["knn_dist"] is None
    back = AuditReport.from_dict(doc)
    assert isinstance(back.models[0], ModelAudit) and isinstance(back.gate, PrivacyGate)
    assert back.to_dict() == doc
    assert not back.passed and back.gate.failing == ["base <b>", "hardened"]
    assert back.model("hardened").delta["delta"] == 10.0 and back.model("hardened").attack_acc1 == 0.25
    with pytest.raises(KeyError, match="hardened"):
        back.model("nope")
    with pytest.raises(BadInputError, match="mishield.audit-report"):
        AuditReport.from_dict({**doc, "schema_version": 99})


def test_the_page_explains_its_columns_and_shows_the_feature_spaces():
    report = _report()
    entry = {"extractor": "prior discriminator (p.safetensors)", "extractor_kind": "public", "evaluator_acc1": 0.25,
             "knn_judge_acc1": 0.5, "knn_judge_acc1_interval": {"low": 0.2, "high": 0.8}, "judge_disagreement": 0.25,
             "false_positive_share": 0.4, "false_positive_share_interval": {"low": 0.1, "high": 0.9}, "fid": 12.5,
             "fid_extrapolated": None, "precision": 0.5, "recall": None, "density": 0.9, "coverage": 0.3,
             "knn_distance_median": 1.0, "distance_histogram": [1, 2, 0, 1]}  # fmt: skip
    report.feature_extractors = [{"extractor": entry["extractor"], "kind": "public", "dims": 1024, "why": "public only",
                                  "knn_judge_ceiling": 0.83, "knn_judge_ceiling_n": 30,
                                  "histogram": {"edges": [0, 1, 2, 3, 4], "private_val": [3, 1, 0, 0], "private_val_median": 0.5}}]  # fmt: skip
    for m in report.models:
        m.metrics["feature_extractors"] = [entry]
        m.per_class[0]["feature_extractors"] = [{"extractor": entry["extractor"], "knn_judge_acc1": 0.75, "fid": 3.0}]
    page = render_html(report, {}, {})
    # every column of the metrics table has a tooltip, and the legend says what the puzzling ones and the verdicts mean
    assert 'title="attack accuracy over every optimised candidate' in page and '<dl class="legend" id="legend">' in page
    for word in ("unfiltered %", "I=0 %", "target conf.", "KNN dist", "leaky", "passes", "inconclusive"):
        assert f"<dt>{word}</dt>" in page or f'<dt><span class="{word}">{word}</span></dt>' in page
    # the feature space: named, its ceiling, one table row and one histogram per model
    assert "In the features of prior discriminator (p.safetensors)" in page and "83.0 %" in page
    assert page.count('<svg class="hist"') == 2 and "40.0" in page and "75.0" in page
    # class labels: the folder name first, the index apart
    assert 'c0 <span class="cid" title="class index">#0</span>' in page
