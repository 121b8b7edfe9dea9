"""`mishield prior train`: train mishield's own DCGAN-like image prior on public data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mishield.cli import console
from mishield.cli.options import MAX_BATCH_SIZE, JsonOpt, OverwriteOpt

app = typer.Typer(help="Image priors for `mishield audit`.", no_args_is_help=True)


@app.command("train")
def train(
    data: Annotated[Path, typer.Option("--data", help="Public images (ImageFolder; labels are ignored), e.g. classes the target never saw.")],
    out: Annotated[Path, typer.Option("--out", help="Prior file to write (.safetensors).")],
    resolution: Annotated[int | None, typer.Option("--resolution", help="Image size: 32, 64, 128 or 256 (default: the smallest that holds the images, e.g. 32 for 28 px Fashion-MNIST).")] = None,
    channels: Annotated[int | None, typer.Option("--channels", help="1 or 3 (default: 1 if the data is greyscale).")] = None,
    latent_dim: Annotated[int, typer.Option("--latent-dim", min=1, help="Latent size z.")] = 128,
    width: Annotated[int, typer.Option("--width", min=4, help="Channel width of the last generator layer.")] = 64,
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 25,
    batch_size: Annotated[int, typer.Option("--batch-size", min=2, max=MAX_BATCH_SIZE)] = 64,
    lr: Annotated[float, typer.Option("--lr", min=0.0)] = 2e-4,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run whose state is beside --out (OUT.train-state); Ctrl-C exits 130, SIGTERM 143, both resumable.")] = False,
    overwrite: OverwriteOpt = False,
    json_output: JsonOpt = False,
) -> None:
    """Train a DCGAN on public data; the result is the default prior of `mishield audit --prior FILE`."""
    from mishield.cli.options import flags_in_errors
    from mishield.cli.progress import epoch_printer, progress_bars
    from mishield.errors import UsageError
    from mishield.models.dcgan import load_generator_file
    from mishield.runtime import resolve_device
    from mishield.training.prior import (
        PriorTrainingConfig,
        samples_path,
        train_prior,
    )

    if channels not in (None, 1, 3):
        raise UsageError(f"--channels must be 1 or 3, got {channels}.")
    config = PriorTrainingConfig(resolution, channels, latent_dim, width, epochs, batch_size, lr, seed)
    with flags_in_errors(train_prior, extra=("resume", "overwrite", "epochs", "batch_size", "lr", "seed", "val_fraction", "input_size")), progress_bars() as progress:
        path = train_prior(data, out, config, device=resolve_device(device), resume=resume, overwrite=overwrite,
                           progress=progress, on_epoch=epoch_printer())
    _, meta = load_generator_file(path)
    summary = {"out": str(path), "samples": str(samples_path(path)), **meta["config"], "training": meta["training"]}
    if json_output:
        console.emit_json(summary)
    else:
        c = meta["config"]
        console.err.print(f"prior {c['resolution']} px, {c['channels']} channel(s), z={c['latent_dim']} -> [bold]{path}[/]")
        console.err.print(f"samples: [bold]{summary['samples']}[/] (judge them by eye: blobs make a weak audit)")
