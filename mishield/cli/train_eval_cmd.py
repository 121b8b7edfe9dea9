"""`mishield train-eval`: train the independent evaluation model an audit needs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mishield.cli import console
from mishield.cli.options import MAX_BATCH_SIZE, JsonOpt, OverwriteOpt


def train_eval(
    data: Annotated[Path, typer.Option("--data", help="Private data the audited models were trained on (ImageFolder).")],
    out: Annotated[Path, typer.Option("--out", help="Evaluation model file to write.")],
    arch: Annotated[str | None, typer.Option("--arch", help="Architecture, different from the audited models' (timm:NAME, torchvision:NAME, package.module:factory; default: mishield's skip-free VGG-style CNN).")] = None,
    input_size: Annotated[int | None, typer.Option("--input-size", min=8, help="Square input size in pixels (default: --prior's resolution, else the smallest of 32/64/128/256 holding the images).")] = None,
    prior: Annotated[Path | None, typer.Option("--prior", help="The mishield prior the audit will use: its resolution becomes the default --input-size.")] = None,
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 20,
    lr: Annotated[float, typer.Option("--lr", min=0.0)] = 1e-3,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, max=MAX_BATCH_SIZE)] = 128,
    val_fraction: Annotated[float | None, typer.Option("--val-fraction", help="Hold out this fraction when --data has no val/ folder.")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    noise: Annotated[float, typer.Option("--noise", min=0.0, max=1.0, help="Std of the Gaussian pixel noise added to training images (pixel units), so that perturbations made against the target fool the evaluator less often (docs/audit.md); 0 turns it off.")] = 0.25,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run whose state is beside --out (OUT.train-state); Ctrl-C exits 130, SIGTERM 143, both resumable.")] = False,
    overwrite: OverwriteOpt = False,
    json_output: JsonOpt = False,
) -> None:
    """Train an evaluation model (default: a skip-free VGG-style CNN) on the private data for `mishield audit`."""
    from mishield.cli.options import flags_in_errors
    from mishield.cli.progress import epoch_printer, progress_bars
    from mishield.runtime import resolve_device
    from mishield.training.evaluator import EvalModelConfig, train_eval_model

    with flags_in_errors(train_eval_model, extra=("resume", "overwrite", "epochs", "batch_size", "lr", "seed", "val_fraction", "input_size")), progress_bars() as progress:
        config = EvalModelConfig(arch=arch, input_size=input_size, epochs=epochs, lr=lr, batch_size=batch_size,
                                 val_fraction=val_fraction, device=resolve_device(device), seed=seed, overwrite=overwrite,
                                 resume=resume, noise=noise)
        summary = train_eval_model(data, out, config=config, prior=prior, progress=progress, on_epoch=epoch_printer())
    if json_output:
        console.emit_json(summary)
    else:
        acc = summary["natural_acc"]
        shown = ("no validation images" if acc is None
                 else f"validation accuracy {100 * acc:.1f} % on {summary['val_images']} held-out images")
        console.err.print(f"evaluation model {summary['arch']}, {len(summary['classes'])} classes, {summary['input_size']} px, "
                          f"{shown} -> [bold]{summary['out']}[/]")
