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
from mishield.fileio import atomic_output, check_writable, check_writable_dir

__all__ = [  # SCHEMA and SCHEMA_VERSION are defined with the report type and re-exported here
    "MAX_SHOWN_CLASSES", "REPORT_FILES", "SCHEMA", "SCHEMA_VERSION", "SHOW_REAL", "SHOW_RECONSTRUCTIONS",
    "bar_chart", "check_outputs", "class_row", "png_bytes", "real_images", "render_html", "stack_rows", "summary_table", "tile",
    "write_report",
]
REPORT_FILES = ("report.json", "report.html")
# Columns of reconstructions / real images per class row, and rows shown in the HTML and grids.
SHOW_RECONSTRUCTIONS = 8
SHOW_REAL = 4
MAX_SHOWN_CLASSES = 100


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


def render_html(report: AuditReport, shown: dict | None = None, real: dict | None = None, prior_samples: torch.Tensor | None = None) -> str:
    """The self-contained page: `shown[grid][class]` reconstructions (`grid`: a model's or an attack
    row's grid path), `real[class]` private images and `prior_samples` (uint8 N, C, H, W) become
    inline PNGs; the template is attack/templates/report.html.j2."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("mishield.audit", "templates"), autoescape=True, undefined=jinja2.StrictUndefined
    )
    env.filters.update(pct=_pct, num=_num, signed=_signed_pct, interval=_interval)
    return env.get_template("report.html.j2").render(
        report=report, options=report.options, chart=bar_chart(report), ci=_ci,
        side_by_side=_side_by_side(report, shown or {}, real or {}), max_classes=MAX_SHOWN_CLASSES,
        rows=_rows(report), prior_samples=None if prior_samples is None else _b64(tile(prior_samples), 64),
    )  # fmt: skip


def write_report(out_dir: Path, report: AuditReport, shown: dict, real: dict, overwrite: bool = False,
                 prior_samples: torch.Tensor | None = None) -> dict[str, Path]:
    """Write report.json, report.html, one PNG grid per model and attack (per class: the
    reconstructions, a gap, the private images) and the prior's samples (`report.prior_samples`).
    `shown[grid][class]`, `real[class]` and `prior_samples` are uint8 (N, C, H, W) images."""
    out_dir = Path(out_dir)
    written: dict[str, Path] = {}
    for i, (grid, per_class) in enumerate(shown.items()):
        rows = [class_row(images, real.get(c, images[:0])) for c, images in list(per_class.items())[:MAX_SHOWN_CLASSES]]
        if rows:
            with atomic_output(out_dir / grid, overwrite) as tmp:
                tmp.write_bytes(png_bytes(stack_rows(rows)))
            written[f"grid{i}"] = out_dir / grid
    if prior_samples is not None and report.prior_samples:
        with atomic_output(out_dir / report.prior_samples, overwrite) as tmp:
            tmp.write_bytes(png_bytes(tile(prior_samples), min_height=64))
        written["prior_samples"] = out_dir / report.prior_samples
    with atomic_output(out_dir / "report.html", overwrite) as tmp:
        tmp.write_text(render_html(report, shown, real, prior_samples), encoding="utf-8")
    written["html"] = out_dir / "report.html"
    # The JSON goes last: its presence means the whole report is there.
    with atomic_output(out_dir / "report.json", overwrite) as tmp:
        tmp.write_text(json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    written["json"] = out_dir / "report.json"
    return written


def summary_table(report: AuditReport):
    """A rich table of the metrics, for the terminal (stderr)."""
    from rich.table import Table

    table = Table(title="mishield audit (intervals: 95 % class bootstrap; the gate reads the upper end)", show_lines=False)
    cols = ("model", "attack", "Acc %", "AttAcc@1 %", "95% interval", "chance %", "unfiltered %", "I=0 %", "AttAcc@5 %",
            "KNN dist", "paired diff (95%)", "Δ", "verdict")  # fmt: skip
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
        _pct(s.get("natural_acc")), _pct(s.get("attack_acc1")), _interval(_ci(s)), _pct(s.get("chance_acc1")),
        _pct(s.get("unfiltered_acc1")), _pct(s.get("selection_only_acc1")), _pct(s.get("attack_acc5")),
        _num(s.get("knn_dist")), "–" if not paired else f"{_signed_pct(paired['estimate'])} ({_interval(paired, True)})",
        _num(d.get("delta")), (verdict or {}).get("status", "–"),
    )  # fmt: skip
