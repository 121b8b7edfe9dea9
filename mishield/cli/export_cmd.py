"""`mishield export MODEL --out model.onnx`: ONNX export, verified against onnxruntime."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mishield.cli import console
from mishield.cli.options import (
    ArchOpt,
    InputSizeOpt,
    JsonOpt,
    MeanOpt,
    ModelArg,
    NumClassesOpt,
    OverwriteOpt,
    StdOpt,
    TrustOpt,
    flags_in_errors,
    parse_floats,
)

OutOpt = Annotated[
    Path,
    typer.Option("--out", help="Destination .onnx file (written only if the parity check passes).", show_default=False),
]
AtolOpt = Annotated[
    float,
    typer.Option("--atol", min=0.0, help="Largest absolute logit difference allowed between PyTorch and onnxruntime."),
]


def export(
    model: ModelArg,
    out: OutOpt,
    arch: ArchOpt = None,
    num_classes: NumClassesOpt = None,
    trust_checkpoint: TrustOpt = False,
    input_size: InputSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    atol: AtolOpt = 1e-4,
    overwrite: OverwriteOpt = False,
    json_output: JsonOpt = False,
) -> None:
    """Export MODEL to a single ONNX file with a dynamic batch axis, checked against onnxruntime.

    Exit code 5 when onnxruntime's logits differ from PyTorch's by more than --atol or pick a
    different top-1 class on the probe batch; the file is then not written.
    """
    from mishield.fileio import claim_output
    from mishield.models import load_model
    from mishield.onnx_export import export_onnx, loaded_model_metadata

    # checked against MODEL and locked before loading and exporting, which take a while
    with flags_in_errors(export_onnx), claim_output(out, overwrite, (model,)):
        err = console.err
        with err.status(f"loading {model}"):
            loaded = load_model(
                model, arch=arch, num_classes=num_classes, trust_checkpoint=trust_checkpoint, input_size=input_size,
                mean=parse_floats(mean, "--mean"), std=parse_floats(std, "--std"),
            )
        with err.status(f"exporting to {out} and checking it with onnxruntime"):
            report = export_onnx(
                loaded.model,
                out,
                input_size=loaded.preprocessing.input_size,
                metadata=loaded_model_metadata(loaded),
                overwrite=overwrite,
                atol=atol,
            )

    if json_output:
        console.emit_json(report.to_dict())
        return
    batch = "dynamic batch" if report.dynamic_batch else f"fixed batch {report.probe_batch}, as the program was exported"
    size = f"{report.file_bytes / 1e6:.1f} MB"
    # soft_wrap: whole lines in CI logs, never folded at the console width
    err.print(f"[bold green]exported[/] {report.path} ({size}, opset {report.opset}, {batch})", soft_wrap=True)
    err.print(
        f"parity   max abs diff {report.max_abs_diff:.2g} <= {atol:.2g}, top-1 agreement "
        f"{report.top1_agreement:.0%} ({report.probe_batch} probe images, onnxruntime CPU)",
        soft_wrap=True,
    )
    err.print(f"time     {report.seconds:.1f} s, exporter: {report.exporter}", soft_wrap=True)
