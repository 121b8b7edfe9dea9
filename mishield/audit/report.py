"""The audit report files: `report.json` (versioned schema), a self-contained `report.html`, PNG grids.

The JSON holds every option and seed, so an audit can be rerun and compared; the HTML embeds
its images (base64 PNG) and styles, so it can be mailed or archived as one file.
"""

from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path

import numpy as np
import torch

from mishield.audit.results import SCHEMA, SCHEMA_VERSION, AuditReport
from mishield.fileio import (
    atomic_output,
    check_writable,
    check_writable_dir,
    staged_folder,
)

__all__ = [  # SCHEMA and SCHEMA_VERSION are defined with the report type and re-exported here
    "COLUMN_HELP",
    "MAX_SHOWN_CLASSES",
    "REPORT_FILES",
    "SCHEMA",
    "SCHEMA_VERSION",
    "SHOW_REAL",
    "SHOW_RECONSTRUCTIONS",
    "bar_chart",
    "check_outputs",
    "class_row",
    "distance_histograms",
    "feature_rows",
    "png_bytes",
    "real_images",
    "render_html",
    "stack_rows",
    "summary_table",
    "tile",
    "write_report",
]
REPORT_FILES = ("report.json", "report.html")
# Columns of reconstructions / real images per class row, and rows shown in the HTML and grids.
SHOW_RECONSTRUCTIONS = 8
SHOW_REAL = 4
MAX_SHOWN_CLASSES = 100
# What each column and verdict of report.html means: its tooltip and the legend under the table (docs/audit.md has the long form).
COLUMN_HELP = {
    "Acc %": "natural accuracy: the model's top-1 accuracy on the held-out private images",
    "AttAcc@1 %": "attack accuracy: share of the kept reconstructions the evaluation model puts in the attacked class (top-1)",
    "95 % interval": "95 % bootstrap interval over classes (the unit that varies); the gate reads its upper end",
    "chance %": "what an evaluator that guesses scores: 1 / number of classes",
    "unfiltered %": "attack accuracy over every optimised candidate, before final selection keeps the K the target is surest of",
    "I=0 %": "attack accuracy with no optimisation (I = 0 steps): picking the best prior samples only; an attack that does "
             "not beat it was too weak to say anything",
    "AttAcc@5 %": "share of kept reconstructions with the attacked class among the evaluator's top 5",
    "KNN dist": "squared distance, in the evaluator's features, from each kept reconstruction to the nearest private "
                "training image of its class, averaged: lower is closer to the private data",
    "target conf.": "the target's own mean confidence in the attacked class on the kept reconstructions (its owner's "
                    "temperature sets it, so the verdict does not read it)",
    "target top-1 %": "share of the kept reconstructions' final crops the target ranks the attacked class first; below half "
                      "the attack did not reach the class and the audit is inconclusive",
    "evaluator acc %": "the evaluation model's accuracy on private validation images at the attack's resolution: how far to "
                       "trust attack accuracy",
    "paired diff % (95 %)": "attack accuracy minus the first model's, with a paired interval; an interval holding 0 cannot "
                            "tell the two apart",
    "ΔAcc": "natural accuracy minus the first model's",
    "Δ": "points of attack accuracy removed per point of natural accuracy lost, against the first model (Koh et al., 2024)",
    "KNN judge %": "attack accuracy by nearest neighbour: a reconstruction counts when its nearest private training image, "
                   "among all classes, is of the attacked class (a judge with no decision boundary to fool)",
    "false pos. %": "share of the evaluator's hits the KNN judge rejects: the estimate of the evaluator's false positives",
    "disagree %": "share of reconstructions the evaluator and the KNN judge judge differently",
    "FID": "Fréchet distance between the reconstructions' and the private images' features (lower is closer; per class "
           "strongly biased upwards by few samples, compare only within one table)",
    "precision": "share of reconstructions inside some private image's 5-NN ball: fidelity",
    "recall": "share of private images inside some reconstruction's 5-NN ball: diversity",
    "density": "how many private balls hold a reconstruction, over 5; about 1 when both come from one distribution",
    "coverage": "share of private images whose 5-NN ball holds a reconstruction: diversity an outlier cannot inflate",
}
VERDICT_HELP = {
    "leaky": "the upper end of the attack-accuracy interval exceeds the gate's threshold",
    "passes": "the upper end of the interval is at or below the threshold",
    "inconclusive": "the attack did not reach some class, fell below chance, or one class only: never passes",
    "not gated": "conclusive, but no --max-attack-acc threshold was given",
}


def check_outputs(out_dir: Path, overwrite: bool, inputs=()) -> None:
    """Refuse before the attack starts, not after an hour of it, when the report would overwrite,
    `out_dir` is an existing file, or it would write into or over one of the audit's `inputs`."""
    check_writable_dir(out_dir, inputs)
    for name in REPORT_FILES:
        check_writable(Path(out_dir) / name, overwrite, inputs)


# ---------------------------------------------------------------------------------------------
# Images


def tile(images: torch.Tensor, pad: int = 2) -> np.ndarray:
    """uint8 (N, C, H, W) images side by side on white, as one HWC uint8 strip (torchvision's make_grid)."""
    from torchvision.utils import make_grid

    if images.shape[0] == 0:
        return np.full((1, 1, 1), 255, dtype=np.uint8)
    grid = make_grid(images, nrow=images.shape[0], padding=pad, pad_value=255)  # 1-channel input comes back as 3
    out = grid.permute(1, 2, 0).numpy()
    return out[..., :1].copy() if images.shape[1] == 1 else out.copy()


def class_row(reconstructions: torch.Tensor, real: torch.Tensor, pad: int = 2) -> np.ndarray:
    """One class as an HWC uint8 strip: reconstructions, a blank tile, real private images (all C,H,W uint8)."""
    blank = torch.full((1, *reconstructions.shape[1:]), 255, dtype=torch.uint8)
    return tile(torch.cat([reconstructions[:SHOW_RECONSTRUCTIONS], blank, real[:SHOW_REAL].to(torch.uint8)]), pad)


def stack_rows(rows: list[np.ndarray]) -> np.ndarray:
    width = max(r.shape[1] for r in rows)
    padded = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return np.concatenate(padded, axis=0)


def png_bytes(array: np.ndarray, min_height: int = 0) -> bytes:
    from PIL import Image

    img = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)
    if 0 < img.height < min_height:  # 32 px thumbnails are unreadable in a browser at 1:1
        scale = math.ceil(min_height / img.height)
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def real_images(items: list, label: int, shape: tuple[int, int, int], count: int = SHOW_REAL) -> torch.Tensor:
    """The first `count` private training images of a class, at the reconstructions' size and channels."""
    from PIL import Image

    from mishield.data import decode_image

    c, h, w = shape
    paths = [p for p, y in items if y == label][:count]
    out = torch.zeros(len(paths), c, h, w, dtype=torch.uint8)
    for i, path in enumerate(paths):
        img = decode_image(path, "L" if c == 1 else "RGB").resize((w, h), Image.BILINEAR)
        arr = np.asarray(img).reshape(h, w, c)
        out[i] = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    return out


# ---------------------------------------------------------------------------------------------
# Writing


def _pct(v: float | None) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _num(v: float | None, digits: int = 2) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _signed_pct(v: float | None) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:+.1f}"


def _short_interval(iv: dict | None) -> str:
    """"(12–48)": a bracketed interval in whole percent, for a cell that also holds its estimate."""
    if not iv or iv.get("low") is None or iv.get("high") is None:
        return ""
    return f"({100 * iv['low']:.0f}–{100 * iv['high']:.0f})"


def _interval(iv: dict | None, signed: bool = False) -> str:
    """"12.0–48.0" (or "+1.0 to +9.0" for a difference); "–" when there is none."""
    if not iv:
        return "–"
    if signed:
        return f"{_signed_pct(iv.get('low'))} to {_signed_pct(iv.get('high'))}"
    return f"{_pct(iv.get('low'))}–{_pct(iv.get('high'))}"


def _ci(metrics: dict) -> dict | None:
    """The @1 interval as {low, high}: the full record, or the bare ci95 pair of older reports."""
    if metrics.get("attack_acc1_interval"):
        return metrics["attack_acc1_interval"]
    pair = metrics.get("attack_acc1_ci95")
    return {"low": pair[0], "high": pair[1]} if pair else None


def _rows(report: AuditReport) -> list[tuple[str, dict, dict | None]]:
    """(label, metrics, verdict) per model, or per model x attack when several attacks ran."""
    if len(report.options.get("attacks") or ()) < 2:
        return [(m.name, m.metrics, m.verdict) for m in report.models]
    return [(f"{m.name} · {r['attack']}", r["metrics"], r["verdict"]) for m in report.models for r in m.attacks]


def bar_chart(report: AuditReport, width: int = 820, bar: int = 26, gap: int = 14) -> dict:
    """Geometry of the SVG bar chart (attack accuracy @1 per model, its interval as a whisker,
    chance and the gate's threshold as vertical lines), laid out here and drawn by the template."""
    left, right, top = 200, 240, 24  # the right margin holds the label beside a whisker that reaches 100 %
    span = width - left - right

    def x(v: float | None) -> float:
        return left + span * min(max(v or 0.0, 0.0), 1.0)

    rows = []
    for i, (label, metrics, verdict) in enumerate(_rows(report)):
        iv, y, acc = _ci(metrics) or {}, top + i * (bar + gap), metrics.get("attack_acc1")
        rows.append({"name": label, "y": y, "mid": y + bar / 2, "x0": left, "w": x(acc) - left,
                     "lo": x(iv.get("low")), "hi": x(iv.get("high")), "has_interval": bool(iv),
                     "label": f"{_pct(acc)} % ({_interval(iv)})", "status": (verdict or {}).get("status", "")})  # fmt: skip
    height = top + len(rows) * (bar + gap) + 24
    chance = report.models[0].metrics.get("chance_acc1") if report.models else None
    lines = [{"x": x(chance), "label": "chance", "cls": "chance"}] if chance is not None else []
    if report.gate is not None:
        lines.append({"x": x(report.gate.max_attack_acc), "label": "threshold", "cls": "threshold"})
    ticks = [{"x": x(t / 4), "label": f"{25 * t} %"} for t in range(5)]
    return {"width": width, "height": height, "bar": bar, "rows": rows, "lines": lines, "ticks": ticks,
            "top": top, "bottom": height - 20}  # fmt: skip


def _b64(array: np.ndarray, min_height: int = 64) -> str:
    return base64.b64encode(png_bytes(array, min_height=min_height)).decode()


def _side_by_side(report: AuditReport, shown: dict, real: dict) -> list[dict]:
    """Per class: the private examples, then every model's best reconstructions, as inline PNGs."""
    rows = []
    for c in report.classes[:MAX_SHOWN_CLASSES]:
        # As many reconstructions per model as private examples, so that several models fit one row.
        cells = [_b64(tile(shown[m.grid][c][:SHOW_REAL]), 48) if c in shown.get(m.grid, {}) else None for m in report.models]
        if not any(cells):
            continue
        name = next((r["name"] for r in report.models[0].per_class if r["class"] == c), str(c))
        rows.append({"class": c, "name": name, "real": _b64(tile(real[c][:SHOW_REAL]), 48) if c in real else None, "models": cells})
    return rows


def _space_entry(metrics: dict, extractor: str) -> dict | None:
    return next((e for e in metrics.get("feature_extractors") or [] if e.get("extractor") == extractor), None)


def feature_rows(report: AuditReport) -> list[dict]:
    """Per feature space of the report: its record and one row of figures per model (per model and
    attack when several attacks ran), for report.html's "Second opinions" tables."""
    out = []
    for space in report.feature_extractors:
        rows = [{"label": label, "e": entry} for label, metrics, _ in _rows(report)
                if (entry := _space_entry(metrics, space["extractor"])) is not None]  # fmt: skip
        out.append({"space": space, "rows": rows})
    return out


def distance_histograms(report: AuditReport, width: int = 250, height: int = 120) -> list[dict]:
    """SVG geometry, per feature space and model, of the histogram of each kept reconstruction's distance
    to the nearest private training image of its class, with the private validation images' histogram
    (the distance a real unseen image of the class has) as an outline; shares, one x scale per space."""
    left, right, top, bottom = 6, 6, 8, 22
    plot_w, plot_h = width - left - right, height - top - bottom
    spaces = []
    for space in report.feature_extractors:
        hist = space.get("histogram") or {}
        edges, ref = hist.get("edges") or [], hist.get("private_val")
        panels = []
        for m in report.models:
            entry = _space_entry(m.metrics, space["extractor"])
            counts = (entry or {}).get("distance_histogram")
            if not counts or not edges:
                continue
            shares = [c / max(sum(counts), 1) for c in counts]
            ref_shares = [c / max(sum(ref), 1) for c in ref] if ref else []
            peak = max(shares + ref_shares) or 1.0
            bw = plot_w / len(shares)
            bars = [{"x": left + i * bw, "w": bw, "y": top + plot_h * (1 - v / peak), "h": plot_h * v / peak} for i, v in enumerate(shares)]
            outline = " ".join(f"{left + i * bw:.1f},{top + plot_h * (1 - v / peak):.1f} {left + (i + 1) * bw:.1f},{top + plot_h * (1 - v / peak):.1f}"
                               for i, v in enumerate(ref_shares))  # fmt: skip
            panels.append({"name": m.name, "bars": bars, "outline": outline, "median": entry.get("knn_distance_median"),
                           "n": sum(counts)})  # fmt: skip
        if panels:
            spaces.append({"extractor": space["extractor"], "panels": panels, "xmax": edges[-1], "ref_median": hist.get("private_val_median"),
                           "width": width, "height": height, "base": top + plot_h, "left": left, "right": width - right})  # fmt: skip
    return spaces


def render_html(report: AuditReport, shown: dict | None = None, real: dict | None = None, prior_samples: torch.Tensor | None = None) -> str:
    """The self-contained page: `shown[grid][class]` reconstructions (`grid`: a model's or an attack
    row's grid path), `real[class]` private images and `prior_samples` (uint8 N, C, H, W) become
    inline PNGs; the template is attack/templates/report.html.j2."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("mishield.audit", "templates"), autoescape=True, undefined=jinja2.StrictUndefined
    )
    env.filters.update(pct=_pct, num=_num, signed=_signed_pct, interval=_interval, short_interval=_short_interval)
    return env.get_template("report.html.j2").render(
        report=report, options=report.options, chart=bar_chart(report), ci=_ci,
        side_by_side=_side_by_side(report, shown or {}, real or {}), max_classes=MAX_SHOWN_CLASSES,
        rows=_rows(report), prior_samples=None if prior_samples is None else _b64(tile(prior_samples), 64),
        help=COLUMN_HELP, verdict_help=VERDICT_HELP, spaces=feature_rows(report), histograms=distance_histograms(report),
    )  # fmt: skip


def write_report(out_dir: Path, report: AuditReport, shown: dict, real: dict, overwrite: bool = False,
                 prior_samples: torch.Tensor | None = None) -> dict[str, Path]:
    """Write report.json, report.html, one PNG grid per model and attack (per class: the
    reconstructions, a gap, the private images) and the prior's samples (`report.prior_samples`).
    `shown[grid][class]`, `real[class]` and `prior_samples` are uint8 (N, C, H, W) images.

    Everything is written into a temporary folder beside `out_dir` and put in place at the end
    (`mishield.fileio.staged_folder`), report.json last: its presence means the whole report is there."""
    out_dir = Path(out_dir)
    written: dict[str, Path] = {}
    with staged_folder(out_dir, overwrite, last="report.json") as staging:
        for i, (grid, per_class) in enumerate(shown.items()):
            rows = [class_row(images, real.get(c, images[:0])) for c, images in list(per_class.items())[:MAX_SHOWN_CLASSES]]
            if rows:
                _write(staging / grid, png_bytes(stack_rows(rows)))
                written[f"grid{i}"] = out_dir / grid
        if prior_samples is not None and report.prior_samples:
            _write(staging / report.prior_samples, png_bytes(tile(prior_samples), min_height=64))
            written["prior_samples"] = out_dir / report.prior_samples
        _write(staging / "report.html", render_html(report, shown, real, prior_samples).encode("utf-8"))
        written["html"] = out_dir / "report.html"
        _write(staging / "report.json", (json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n").encode("utf-8"))
        written["json"] = out_dir / "report.json"
    return written


def _write(path: Path, data: bytes) -> None:
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def summary_table(report: AuditReport):
    """A rich table of the metrics, for the terminal (stderr)."""
    from rich.table import Table

    table = Table(title="mishield audit (intervals: 95 % class bootstrap; the gate reads the upper end)", show_lines=False)
    cols = ("model", "attack", "Acc %", "AttAcc@1 %", "95% interval", "KNN judge %", "chance %", "unfiltered %", "I=0 %",
            "AttAcc@5 %", "KNN dist", "paired diff (95%)", "Δ", "verdict")  # fmt: skip
    for col in cols:
        table.add_column(col, justify="left" if col in ("model", "attack", "verdict") else "right")
    for m in report.models:
        several = len(m.attacks) > 1
        for r in (m.attacks if several else [{"attack": m.attack, "metrics": m.metrics, "delta": m.delta, "verdict": m.verdict}]):
            masked = " (cannot decide: masking)" if r.get("decides") is False else ""
            table.add_row(m.name, f"{r['attack'] or 'ppa'}{masked}", *_cells(r["metrics"], r.get("delta") or {}, r.get("verdict")))
        if several:  # the model's worst case over attacks, which the gate reads
            table.add_row(m.name, f"worst: {m.attack}", *_cells(m.metrics, m.delta or {}, m.verdict), style="bold")
    return table


def _cells(s: dict, d: dict, verdict: dict | None) -> tuple[str, ...]:
    """One summary-table row's figures after the model and attack columns."""
    paired = s.get("paired_diff_acc1_interval")
    return (
        _pct(s.get("natural_acc")), _pct(s.get("attack_acc1")), _interval(_ci(s)), _pct(s.get("knn_judge_acc1")), _pct(s.get("chance_acc1")),
        _pct(s.get("unfiltered_acc1")), _pct(s.get("selection_only_acc1")), _pct(s.get("attack_acc5")),
        _num(s.get("knn_dist")), "–" if not paired else f"{_signed_pct(paired['estimate'])} ({_interval(paired, True)})",
        _num(d.get("delta")), (verdict or {}).get("status", "–"),
    )  # fmt: skip
