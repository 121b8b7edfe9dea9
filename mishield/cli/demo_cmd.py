"""`mishield demo`: train, harden, audit and export on embedded data (Omniglot or Fashion-MNIST), and show the table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mishield.cli import console
from mishield.cli.options import JsonOpt


def demo(
    dataset: Annotated[str, typer.Option("--dataset", help="omniglot (129 private handwritten characters: intervals narrow enough to compare models) or fashion-mnist (5 private classes).")] = "omniglot",
    quick: Annotated[bool, typer.Option("--quick", help="Tiny but real run (about a minute of CPU time) instead of the full demo (Omniglot: about 8 minutes).")] = False,
    out: Annotated[Path, typer.Option("--out", help="Folder for every artefact; an interrupted demo continues from what it holds.")] = Path("mishield-demo"),
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    json_output: JsonOpt = False,
) -> None:
    """Run the whole pipeline on built-in data: train a target, harden copies, audit how much each leaks
    (with intervals that say how much the audit can tell) and export to ONNX."""
    from mishield.cli.options import flags_in_errors
    from mishield.cli.progress import epoch_printer, progress_bars
    from mishield.demo import DemoConfig, run_demo
    from mishield.fileio import output_lock

    def log(line: str) -> None:
        console.err.print(f"[bold]{line}[/]")

    # one demo per folder: a second one into the same --out stops at once (exit 2)
    with flags_in_errors(run_demo, DemoConfig), output_lock(out), progress_bars() as progress:
        config = DemoConfig(dataset=dataset, quick=quick, device=device, seed=seed)
        result = run_demo(out, config=config, progress=progress, on_epoch=epoch_printer(), log=log)
    if json_output:
        console.emit_json(result.to_dict())
        return
    _print_table(result)


TITLES = {
    "omniglot": "Model inversion on Omniglot ({private} private characters; prior trained on {public} others)",
    "fashion-mnist": "Model inversion on Fashion-MNIST (private classes 0-4, prior trained on 5-9)",
}


def _pct(v) -> str:
    return "   n/a" if v is None else f"{100 * v:5.1f}%"


def _print_table(result) -> None:
    from rich.table import Table

    table = Table(title=TITLES[result.dataset].format(private=len(result.private_classes), public=len(result.public_classes)))
    for head in ("model", "natural acc", "attack acc@1 [95% CI]", "acc@5", "KNN dist", "vs original [95% CI]", "Δ", "verdict"):
        table.add_column(head, justify="left" if head == "model" else "right")
    for r in result.rows:
        lo, hi = r["attack_acc1_ci95"]
        paired = "baseline" if r["paired_diff"] is None else (
            f"{100 * r['paired_diff']:+.1f} pts [{100 * r['paired_diff_ci95'][0]:+.1f}, {100 * r['paired_diff_ci95'][1]:+.1f}]")
        table.add_row(r["model"], _pct(r["natural_acc"]), f"{_pct(r['attack_acc1'])} [{_pct(lo)}, {_pct(hi)}]",
                      _pct(r["attack_acc5"]), "n/a" if r["knn_dist"] is None else f"{r['knn_dist']:.1f}", paired,
                      "n/a" if r["delta"] is None else f"{r['delta']:.2f}", r.get("verdict") or "")
    console.out.print(table)
    for r in result.rows:
        if r.get("verdict") == "inconclusive":
            console.out.print(f"[yellow]{r['model']}: inconclusive[/] — {r['verdict_reason']}")
    for warning in result.warnings:
        console.out.print(f"[yellow]warning:[/] {warning}")
    onnx = result.onnx
    console.out.print(f"ONNX: {onnx['path']} (onnxruntime parity max |diff| {onnx['max_abs_diff']:.1e})")
    console.out.print(f"report: {result.report_html}   picture: {result.figure}   ({result.seconds:.0f} s)")
    classes = result.rows[0]["classes"] if result.rows else 0
    console.out.print(f"Read the interval, not the point: its unit is the attacked class ({classes} here; docs/audit.md).")
