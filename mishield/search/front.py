"""OUT.search.svg: the privacy/utility front of a defence search, written by hand (no plotting
library): natural accuracy across, worst-case attack accuracy @1 up, each model with the 95 %
interval of its attack accuracy as a bar; the original, every candidate, the pick and (when
re-measured) the fully fine-tuned pick; the budget as a dashed line; the front (models no other
model beats on both axes, by the point estimates) as a line. Lower and further right is better.
"""

from __future__ import annotations

from html import escape

WIDTH, HEIGHT = 860, 620
LEFT, RIGHT, TOP, BOTTOM = 80, 230, 60, 70  # the legend sits in the right margin
COLOURS = {"original": "#222222", "within": "#1f6fb4", "outside": "#9a9a9a", "pick": "#d62728", "final": "#d62728"}


def _range(values: list[float], pad: float, low: float = 0.0, high: float = 1.0) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    span = max(hi - lo, 0.05)
    return max(low, lo - pad * span), min(high, hi + pad * span)


def _ticks(lo: float, hi: float) -> list[float]:
    step = next(s for s in (0.01, 0.02, 0.05, 0.1, 0.2, 0.25) if (hi - lo) / s <= 8)
    first = round(lo / step + 0.4999) * step
    return [round(first + i * step, 6) for i in range(int((hi - first) / step + 1e-9) + 1)]


def _front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The non-dominated points (higher accuracy, lower attack accuracy), by accuracy."""
    keep = [p for p in points if not any(q != p and q[0] >= p[0] and q[1] <= p[1] for q in points)]
    return sorted(set(keep))


def front_svg(doc: dict) -> str:
    """The SVG text for a search document (`SearchResult.to_dict()`)."""
    base, rows, final = doc["baseline"], doc["candidates"], doc.get("final")
    models = [("original", base)] + [(r["name"], r) for r in rows] + ([("final", final)] if final else [])
    shown = [(n, m) for n, m in models if m.get("natural_acc") is not None and m.get("attack_acc1") is not None]
    if not shown:
        return _empty("no model has both a natural accuracy and an attack accuracy to plot")
    budget = None if base.get("natural_acc") is None else base["natural_acc"] - doc["options"]["max_acc_drop"]
    xs = [m["natural_acc"] for _, m in shown] + ([budget] if budget is not None and budget >= 0 else [])
    ys = [v for _, m in shown for v in (m["attack_acc1_ci95"] or [m["attack_acc1"]] * 2) if v is not None]
    x0, x1 = _range(xs, 0.15)
    y0, y1 = _range(ys + [0.0], 0.08)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return TOP + (1 - (y - y0) / (y1 - y0)) * plot_h

    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" '
           'font-family="DejaVu Sans, Arial, sans-serif" font-size="12">'),
           f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
           f'<text x="{LEFT}" y="28" font-size="16" font-weight="bold">{escape(doc.get("title") or "Privacy/utility front")}</text>',
           (f'<text x="{LEFT}" y="46" fill="#555">lower is more private, further right more accurate; bars: 95 % interval '
           f'of attack accuracy ({escape(str(doc["options"]["audit"].get("preset", "")))} audit)</text>')]
    out += _axes(x0, x1, y0, y1, px, py)
    if budget is not None and x0 <= budget <= x1:
        out.append(f'<rect class="outside-budget" x="{LEFT}" y="{TOP}" width="{px(budget) - LEFT:.1f}" height="{plot_h}" fill="#f2f2f2"/>')
        out.append(f'<line class="budget" x1="{px(budget):.1f}" y1="{TOP}" x2="{px(budget):.1f}" y2="{TOP + plot_h}" '
                   'stroke="#777" stroke-dasharray="6 4"/>')
        out.append(f'<text x="{px(budget) + 4:.1f}" y="{TOP + 14}" fill="#555">budget: {100 * doc["options"]["max_acc_drop"]:.1f} pts below the original</text>')
    line = _front([(m["natural_acc"], m["attack_acc1"]) for _, m in shown])
    if len(line) > 1:
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in line)
        out.append(f'<polyline class="front" points="{path}" fill="none" stroke="#1f6fb4" stroke-opacity="0.35" stroke-width="2"/>')
    labels = _Labels(WIDTH - RIGHT)
    for name, m in shown:
        out += _point(name, m, doc.get("pick"), px, py, labels)
    out += _legend()
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _axes(x0, x1, y0, y1, px, py) -> list[str]:
    bottom, right = HEIGHT - BOTTOM, WIDTH - RIGHT
    out = [f'<line x1="{LEFT}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="black"/>',
           f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{bottom}" stroke="black"/>']
    for t in _ticks(x0, x1):
        out.append(f'<line x1="{px(t):.1f}" y1="{bottom}" x2="{px(t):.1f}" y2="{bottom + 5}" stroke="black"/>'
                   f'<text x="{px(t):.1f}" y="{bottom + 19}" text-anchor="middle">{100 * t:g}</text>')
    for t in _ticks(y0, y1):
        out.append(f'<line x1="{LEFT - 5}" y1="{py(t):.1f}" x2="{LEFT}" y2="{py(t):.1f}" stroke="black"/>'
                   f'<line x1="{LEFT}" y1="{py(t):.1f}" x2="{right}" y2="{py(t):.1f}" stroke="#eee"/>'
                   f'<text x="{LEFT - 9}" y="{py(t) + 4:.1f}" text-anchor="end">{100 * t:g}</text>')
    out.append(f'<text x="{(LEFT + right) / 2:.0f}" y="{HEIGHT - 24}" text-anchor="middle">natural accuracy (%)</text>')
    out.append(f'<text transform="translate(24 {(TOP + bottom) / 2:.0f}) rotate(-90)" text-anchor="middle">'
               'worst-case attack accuracy @1 (%)</text>')
    return out


class _Labels:
    """Places each point's label beside it where it overlaps no label placed before (estimated
    text boxes: no font metrics without a renderer), left of the point near the right edge."""

    CHAR, LINE = 6.2, 13.0  # px per character and per line at 11 px

    def __init__(self, right: float):
        self.right, self.boxes = right, []

    def place(self, x: float, y: float, text: str) -> tuple[float, float, str]:
        width = self.CHAR * len(text)
        anchor, left = ("end", x - 12 - width) if x + 12 + width > self.right else ("start", x + 12)
        for shift in (-6, 10, -20, 24, -34, 38, -48, 52):
            box = (left, y + shift - self.LINE + 3, left + width, y + shift + 3)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in self.boxes):
                break
        self.boxes.append(box)
        return (x - 12 if anchor == "end" else x + 12), y + shift, anchor


def _point(name: str, m: dict, pick: str | None, px, py, labels: _Labels) -> list[str]:
    x, y = px(m["natural_acc"]), py(m["attack_acc1"])
    kind = "original" if name == "original" else "final" if name == "final" else "pick" if name == pick else (
        "within" if m.get("within_budget") else "outside")
    colour = COLOURS[kind]
    out = [f'<g class="model {kind}" data-name="{escape(name)}">']
    if m.get("attack_acc1_ci95") and None not in m["attack_acc1_ci95"]:
        lo, hi = (py(v) for v in m["attack_acc1_ci95"])
        out.append(f'<line class="interval" x1="{x:.1f}" y1="{lo:.1f}" x2="{x:.1f}" y2="{hi:.1f}" stroke="{colour}" stroke-width="1.5"/>'
                   f'<line x1="{x - 4:.1f}" y1="{lo:.1f}" x2="{x + 4:.1f}" y2="{lo:.1f}" stroke="{colour}"/>'
                   f'<line x1="{x - 4:.1f}" y1="{hi:.1f}" x2="{x + 4:.1f}" y2="{hi:.1f}" stroke="{colour}"/>')
    if kind == "original":
        out.append(f'<rect x="{x - 5:.1f}" y="{y - 5:.1f}" width="10" height="10" fill="{colour}"/>')
    elif kind == "final":
        out.append(f'<path d="M {x:.1f} {y - 8:.1f} L {x + 8:.1f} {y:.1f} L {x:.1f} {y + 8:.1f} L {x - 8:.1f} {y:.1f} Z" '
                   f'fill="none" stroke="{colour}" stroke-width="2"/>')  # hollow: the original often sits under it
    else:
        fill = colour if kind != "outside" else "white"
        out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="{fill}" stroke="{colour}" stroke-width="1.5"/>')
        if kind == "pick":
            out.append(f'<circle class="pick-ring" cx="{x:.1f}" cy="{y:.1f}" r="10" fill="none" stroke="{colour}" stroke-width="2"/>')
    label = {"original": "original", "final": "pick, fully fine-tuned"}.get(kind, name + (" (pick)" if kind == "pick" else ""))
    lx, ly, anchor = labels.place(x, y, label)
    out.append(f'<text x="{lx:.1f}" y="{ly:.1f}" text-anchor="{anchor}" fill="{colour}" font-size="11">{escape(label)}</text></g>')
    return out


def _legend() -> list[str]:
    x, y = WIDTH - RIGHT + 20, TOP + 10
    items = [("original", "original model", "rect"), ("within", "candidate within budget", "dot"),
             ("outside", "candidate outside budget", "ring"), ("pick", "the pick", "pick"), ("final", "pick after full fine-tuning", "diamond")]
    out = [f'<text x="{x}" y="{y}" font-weight="bold">legend</text>']
    for i, (kind, text, shape) in enumerate(items):
        cy, c = y + 22 + 22 * i, COLOURS[kind]
        if shape == "rect":
            out.append(f'<rect x="{x - 5}" y="{cy - 5}" width="10" height="10" fill="{c}"/>')
        elif shape == "diamond":
            out.append(f'<path d="M {x} {cy - 7} L {x + 7} {cy} L {x} {cy + 7} L {x - 7} {cy} Z" fill="white" stroke="{c}" stroke-width="2"/>')
        else:
            out.append(f'<circle cx="{x}" cy="{cy}" r="5" fill="{"white" if shape == "ring" else c}" stroke="{c}" stroke-width="1.5"/>')
            if shape == "pick":
                out.append(f'<circle cx="{x}" cy="{cy}" r="10" fill="none" stroke="{c}" stroke-width="2"/>')
        out.append(f'<text x="{x + 16}" y="{cy + 4}">{text}</text>')
    cy = y + 22 + 22 * len(items)
    out.append(f'<line x1="{x - 8}" y1="{cy}" x2="{x + 8}" y2="{cy}" stroke="#777" stroke-dasharray="6 4"/>'
               f'<text x="{x + 16}" y="{cy + 4}">accuracy budget</text>')
    out.append(f'<line x1="{x - 8}" y1="{cy + 22}" x2="{x + 8}" y2="{cy + 22}" stroke="#1f6fb4" stroke-opacity="0.35" stroke-width="2"/>'
               f'<text x="{x + 16}" y="{cy + 26}">front (point estimates)</text>')
    return out


def _empty(why: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="120"><rect width="{WIDTH}" height="120" fill="white"/>'
            f'<text x="20" y="60" font-family="sans-serif">{escape(why)}</text></svg>\n')
