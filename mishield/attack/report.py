"""The audit report files: `report.json` (versioned schema), a self-contained `report.html`, PNG grids.

The JSON holds every option and seed, so an audit can be rerun and compared; the HTML embeds
its images (base64 PNG) and styles, so it can be mailed or archived as one file.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

import numpy as np
import torch

from mishield.attack.results import SCHEMA, SCHEMA_VERSION, AuditReport
from mishield.fileio import atomic_output, check_writable, check_writable_dir

__all__ = [  # SCHEMA and SCHEMA_VERSION are defined with the report type and re-exported here
    "MAX_SHOWN_CLASSES", "REPORT_FILES", "SCHEMA", "SCHEMA_VERSION", "SHOW_REAL", "SHOW_RECONSTRUCTIONS",
    "check_outputs", "class_row", "png_bytes", "real_images", "render_html", "stack_rows", "summary_table",
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


def class_row(reconstructions: torch.Tensor, real: torch.Tensor, pad: int = 2) -> np.ndarray:
    """One class as an HWC uint8 strip: reconstructions, a gap, real private images (all C,H,W uint8)."""
    c, h, w = reconstructions.shape[1:]
    tiles = list(reconstructions[:SHOW_RECONSTRUCTIONS]) + [None] + list(real[:SHOW_REAL])
    row = np.full((h + 2 * pad, len(tiles) * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        if tile is not None:
            x = pad + i * (w + pad)
            row[pad : pad + h, x : x + w] = tile.permute(1, 2, 0).numpy()
    return row


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

    c, h, w = shape
    paths = [p for p, y in items if y == label][:count]
    out = torch.zeros(len(paths), c, h, w, dtype=torch.uint8)
    for i, path in enumerate(paths):
        with Image.open(path) as img:
            img = img.convert("L" if c == 1 else "RGB").resize((w, h), Image.BILINEAR)
            arr = np.asarray(img).reshape(h, w, c)
        out[i] = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    return out


# ---------------------------------------------------------------------------------------------
# Writing


def _fmt_pct(v: float | None) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _fmt_num(v: float | None, digits: int = 2) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _fmt_signed_pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:+.1f}"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}.bar{background:#d9534f;height:12px;display:inline-block}
.barbox{width:200px;background:#eee;display:inline-block}.row img{image-rendering:pixelated;display:block}
.note{color:#666;font-size:90%}h2{margin-top:2em;border-bottom:1px solid #ddd}code{background:#f6f6f6;padding:1px 3px}
"""


def _metrics_table(report: AuditReport) -> str:
    head = (
        "<tr><th class=l>model</th><th>Acc %</th><th>AttAcc@1 %</th><th>95% CI</th><th>AttAcc@5 %</th>"
        "<th>KNN dist</th><th>n</th><th>ΔAcc</th><th>ΔAttAcc@1</th><th>Δ</th></tr>"
    )
    rows = []
    for m in report.models:
        s, d = m.metrics, m.delta or {}
        ci = s.get("attack_acc1_ci95") or [None, None]
        rows.append(
            f"<tr><td class=l>{html.escape(m.name)}</td><td>{_fmt_pct(s.get('natural_acc'))}</td>"
            f"<td><b>{_fmt_pct(s['attack_acc1'])}</b></td><td>{_fmt_pct(ci[0])}–{_fmt_pct(ci[1])}</td>"
            f"<td>{_fmt_pct(s['attack_acc5'])}</td><td>{_fmt_num(s.get('knn_dist'))}</td><td>{s['n']}</td>"
            f"<td>{_fmt_signed_pct(d.get('natural_acc'))}</td><td>{_fmt_signed_pct(d.get('attack_acc1'))}</td>"
            f"<td>{_fmt_num(d.get('delta'))}</td></tr>"
        )
    return f"<table>{head}{''.join(rows)}</table>"


def render_html(report: AuditReport, class_rows: dict[int, dict[int, bytes]]) -> str:
    """`class_rows[model_index][class_id]` are the PNG strips embedded beside each class."""
    opts = report.options
    parts = [
        "<!doctype html><html><head><meta charset=utf-8><title>mishield audit</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>mishield audit: model-inversion leakage</h1>",
        (
            f"<p class=note>PPA-style attack, prior <code>{html.escape(str(report.prior.get('source')))}</code> "
        f"({html.escape(report.prior['kind'])}), evaluation model <code>{html.escape(str(report.eval_model.get('source')))}</code>; "
        f"S={opts['samples']} C={opts['candidates']} I={opts['iterations']} K={opts['keep']} A={opts['final_augmentations']}, "
        f"seed {opts['seed']}, {len(report.classes)} classes audited. Attack accuracy is the evaluation model's "
        "agreement with the attacked class on the K kept reconstructions per class; Δ = attack-accuracy drop / "
            "accuracy drop against the first model.</p>"
        ),
        _metrics_table(report),
    ]
    gate = report.gate
    if gate:
        verdict = "PASSED" if gate.passed else "FAILED"
        parts.append(f"<p><b>Privacy gate {verdict}</b>: maximum attack accuracy @1 {_fmt_pct(gate.max_attack_acc)} %.</p>")
    for mi, m in enumerate(report.models):
        parts.append(f"<h2>{html.escape(m.name)}</h2>")
        parts.append("<table><tr><th class=l>class</th><th class=l>attack acc @1</th><th>%</th><th>KNN</th><th class=l>best reconstructions | private images</th></tr>")
        for row in m.per_class[:MAX_SHOWN_CLASSES]:
            pct = row["attack_acc1"]
            bar = f"<span class=barbox><span class=bar style='width:{200 * pct:.0f}px'></span></span>"
            png = class_rows.get(mi, {}).get(row["class"])
            img = f"<img alt='class {row['class']}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>" if png else ""
            parts.append(
                f"<tr class=row><td class=l>{row['class']} {html.escape(row['name'])}</td><td class=l>{bar}</td>"
                f"<td>{_fmt_pct(pct)}</td><td>{_fmt_num(row.get('knn_dist'))}</td><td class=l>{img}</td></tr>"
            )
        parts.append("</table>")
        if len(m.per_class) > MAX_SHOWN_CLASSES:
            parts.append(f"<p class=note>{len(m.per_class) - MAX_SHOWN_CLASSES} more classes in report.json.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(out_dir: Path, report: AuditReport, class_rows: dict[int, dict[int, np.ndarray]], overwrite: bool = False) -> dict[str, Path]:
    """Write report.json, report.html and one PNG grid per model (grids/<index>_<name>.png)."""
    out_dir = Path(out_dir)
    written: dict[str, Path] = {}
    pngs: dict[int, dict[int, bytes]] = {}
    for mi, rows in class_rows.items():
        pngs[mi] = {c: png_bytes(r, min_height=64) for c, r in rows.items()}
        if rows:
            shown = list(rows.values())[:MAX_SHOWN_CLASSES]
            path = out_dir / report.models[mi].grid
            with atomic_output(path, overwrite) as tmp:
                tmp.write_bytes(png_bytes(stack_rows(shown)))
            written[f"grid{mi}"] = path
    with atomic_output(out_dir / "report.html", overwrite) as tmp:
        tmp.write_text(render_html(report, pngs), encoding="utf-8")
    written["html"] = out_dir / "report.html"
    # The JSON goes last: its presence means the whole report is there.
    with atomic_output(out_dir / "report.json", overwrite) as tmp:
        tmp.write_text(json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    written["json"] = out_dir / "report.json"
    return written


def summary_table(report: AuditReport):
    """A rich table of the metrics, for the terminal (stderr)."""
    from rich.table import Table

    table = Table(title="mishield audit", show_lines=False)
    for col in ("model", "Acc %", "AttAcc@1 %", "95% CI", "AttAcc@5 %", "KNN dist", "n", "ΔAttAcc@1", "Δ"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for m in report.models:
        s, d = m.metrics, m.delta or {}
        ci = s.get("attack_acc1_ci95") or [None, None]
        table.add_row(
            m.name, _fmt_pct(s.get("natural_acc")), _fmt_pct(s["attack_acc1"]), f"{_fmt_pct(ci[0])}–{_fmt_pct(ci[1])}",
            _fmt_pct(s["attack_acc5"]), _fmt_num(s.get("knn_dist")), str(s["n"]),
            _fmt_signed_pct(d.get("attack_acc1")), _fmt_num(d.get("delta")),
        )  # fmt: skip
    return table
