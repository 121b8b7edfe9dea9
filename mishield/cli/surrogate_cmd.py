"""`mishield surrogate train`: distil a surrogate of the target for the adaptive (LOMMA) attack."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mishield.cli import console
from mishield.cli.options import (
    MAX_BATCH_SIZE,
    InputSizeOpt,
    JsonOpt,
    ModelArg,
    NumClassesOpt,
    OverwriteOpt,
    TrustOpt,
)

app = typer.Typer(help="Surrogate models for the adaptive attack of `mishield audit`.", no_args_is_help=True)


@app.command("train")
def train(
    target: ModelArg,
    public: Annotated[Path, typer.Option("--public", help="Public images (ImageFolder or a flat folder; labels are ignored), never the private data.")],
    out: Annotated[Path, typer.Option("--out", help="Surrogate model file to write.")],
    surrogate_arch: Annotated[str, typer.Option("--surrogate-arch", help="Surrogate architecture: timm:NAME, torchvision:NAME or package.module:factory (default: a ResNet, with skips: the adaptive case).")] = "torchvision:resnet18",
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size", min=2, max=MAX_BATCH_SIZE)] = 64,
    lr: Annotated[float, typer.Option("--lr", min=0.0)] = 1e-3,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="Distillation temperature T (KL of the softened outputs, times T^2).")] = 4.0,
    val_fraction: Annotated[float, typer.Option("--val-fraction", help="Held-out fraction of the public images the agreement is measured on.")] = 0.1,
    arch: Annotated[str | None, typer.Option("--arch", help="TARGET's architecture when its file does not record one (a plain state dict): timm:NAME, torchvision:NAME or package.module:factory.")] = None,
    num_classes: NumClassesOpt = None,
    input_size: InputSizeOpt = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run whose state is beside --out (OUT.train-state); Ctrl-C exits 130, SIGTERM 143, both resumable.")] = False,
    overwrite: OverwriteOpt = False,
    trust_checkpoint: TrustOpt = False,
    json_output: JsonOpt = False,
) -> None:
    """Distil a surrogate from TARGET's soft outputs on public images; `mishield audit` attacks it with the target."""
    from mishield.cli.options import flags_in_errors
    from mishield.cli.progress import epoch_printer, progress_bars
    from mishield.training.distillation import SurrogateConfig, train_surrogate

    with flags_in_errors(train_surrogate, extra=("resume", "overwrite", "epochs", "batch_size", "lr", "seed", "val_fraction", "input_size")), progress_bars() as progress:
        config = SurrogateConfig(arch=surrogate_arch, epochs=epochs, batch_size=batch_size, lr=lr, temperature=temperature,
                                 resolution=input_size, device=device, seed=seed, resume=resume, overwrite=overwrite,
                                 trust_checkpoint=trust_checkpoint, val_fraction=val_fraction)
        result = train_surrogate(target, public, out, config=config, progress=progress, on_epoch=epoch_printer(),
                                 load_options={"arch": arch, "num_classes": num_classes})
    for warning in result.warnings:
        console.err.print(f"[yellow]warning:[/] {warning}")
    if json_output:
        console.emit_json(result.to_dict())
    else:
        console.err.print(
            f"surrogate {result.arch} of {result.target_name}: agrees on {100 * result.agreement:.1f} % of "
            f"{result.agreement_n} held-out public images -> [bold]{result.out}[/]"
        )
