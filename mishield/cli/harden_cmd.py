"""`mishield harden MODEL --method rolss|ssf --out FILE [--data DIR ...]`: rewrite the last stage's
skips and, given private training data, fine-tune the rewritten model (TTS or finetune, + BiDO)."""

from __future__ import annotations

import os
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
    SitesOpt,
    StageOpt,
    StdOpt,
    TrustOpt,
    parse_floats,
)

DEFAULT_EPOCHS_WITH_DATA = 10
SUMMARY_EPOCHS = 12  # rows of the per-epoch table; the JSON-lines log has them all
TRAINING_PANEL = "Fine-tuning (needs --data)"


def state_path_for(out: Path) -> Path:
    """The resumable training state written beside the output while training runs."""
    return out.with_name(out.name + ".train-state")


def log_path_for(out: Path) -> Path:
    """The JSON-lines training log written beside the output."""
    return out.with_name(out.name + ".train.jsonl")


# Options a --recipe file may set (the training recipe and the surgery it applies).
RECIPE_KEYS = ("method", "alpha", "stage", "sites", "schedule", "epochs", "stage1_epochs", "lr", "batch_size",
               "bido", "bido_lx", "bido_ly", "seed", "val_fraction")


def harden(
    ctx: typer.Context,
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", help="Where to write the hardened model file.")],
    method: Annotated[str, typer.Option("--method", help="rolss (remove skips) or ssf (scale skips by --alpha).")] = "rolss",
    alpha: Annotated[
        float | None,
        typer.Option("--alpha", min=0.0, max=1.0, help="SSF scale k (default 0.2 additive, 0.01 concatenative)."),
    ] = None,
    epochs: Annotated[
        int | None,
        typer.Option("--epochs", min=0, show_default=False, rich_help_panel=TRAINING_PANEL,
                     help=f"Fine-tuning epochs after surgery (TTS stage 2). Default: {DEFAULT_EPOCHS_WITH_DATA} "
                          "with --data, else 0 (surgery only)."),
    ] = None,
    stage: StageOpt = None,
    sites: SitesOpt = None,
    arch: ArchOpt = None,
    num_classes: NumClassesOpt = None,
    trust_checkpoint: TrustOpt = False,
    input_size: InputSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    overwrite: OverwriteOpt = False,
    json_output: JsonOpt = False,
    data: Annotated[
        Path | None,
        typer.Option("--data", rich_help_panel=TRAINING_PANEL,
                     help="Private training images: an ImageFolder (one sub-folder per class), or a folder "
                          "with train/ and val/ ImageFolders."),
    ] = None,
    val_data: Annotated[
        Path | None,
        typer.Option("--val-data", rich_help_panel=TRAINING_PANEL,
                     help="Validation ImageFolder (default: DATA/val, or --val-fraction of DATA)."),
    ] = None,
    val_fraction: Annotated[
        float | None,
        typer.Option("--val-fraction", min=0.0, max=1.0, rich_help_panel=TRAINING_PANEL,
                     help="Hold out this fraction of each class of DATA for validation (seeded by --seed)."),
    ] = None,
    schedule: Annotated[
        str | None,
        typer.Option("--schedule", show_default=False, rich_help_panel=TRAINING_PANEL,
                     help="tts (stage 1 with full skips, then surgery + stage 2) or finetune (surgery, then "
                          "train). Default: finetune for a trained checkpoint (its training was stage 1), "
                          "tts for an untrained architecture spec."),
    ] = None,
    stage1_epochs: Annotated[
        int | None,
        typer.Option("--stage1-epochs", min=0, show_default=False, rich_help_panel=TRAINING_PANEL,
                     help="TTS stage-1 epochs with full skips (default 5, the paper's)."),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option("--lr", min=0.0, show_default=False, rich_help_panel=TRAINING_PANEL,
                     help="Adam learning rate (default 1e-4 for a trained checkpoint, the recipe's 1e-3 for "
                          "random weights or --reset-head); decays x0.1 at 75% and 90% of all epochs."),
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, rich_help_panel=TRAINING_PANEL, help="Images per step (per GPU under torchrun).")
    ] = 128,
    bido: Annotated[
        bool, typer.Option("--bido", rich_help_panel=TRAINING_PANEL,
                           help="Add BiDO's HSIC terms over the stem and stage outputs to the loss.")
    ] = False,
    bido_lx: Annotated[
        float, typer.Option("--bido-lx", min=0.0, rich_help_panel=TRAINING_PANEL, help="BiDO weight of HSIC(input, feature).")
    ] = 0.05,
    bido_ly: Annotated[
        float, typer.Option("--bido-ly", min=0.0, rich_help_panel=TRAINING_PANEL, help="BiDO weight of HSIC(label, feature).")
    ] = 0.5,
    resume: Annotated[
        bool, typer.Option("--resume", rich_help_panel=TRAINING_PANEL,
                           help="Continue an interrupted run from OUT.train-state (same command otherwise).")
    ] = False,
    seed: Annotated[int, typer.Option("--seed", rich_help_panel=TRAINING_PANEL, help="Seed for data order, augmentation and splits.")] = 0,
    device: Annotated[
        str, typer.Option("--device", rich_help_panel=TRAINING_PANEL, help="auto (CUDA when present), cpu, cuda or cuda:N.")
    ] = "auto",
    compile_model: Annotated[
        bool, typer.Option("--compile", rich_help_panel=TRAINING_PANEL, help="torch.compile the model (faster steps after a slow first one).")
    ] = False,
    reset_head: Annotated[
        bool, typer.Option("--reset-head", rich_help_panel=TRAINING_PANEL,
                           help="Replace the classifier with a new one for DATA's classes.")
    ] = False,
    workers: Annotated[
        int | None, typer.Option("--workers", min=0, rich_help_panel=TRAINING_PANEL,
                                    help="Data-loading worker processes (default: up to 8 on CUDA, 0 on small CPUs).")
    ] = None,
    recipe_file: Annotated[
        Path | None,
        typer.Option("--recipe", help="YAML file of defaults for these options (e.g. recipes/paper-tts.yaml); "
                                      "flags given on the command line win."),
    ] = None,
) -> None:
    """Rewrite the model's last-stage skip connections (RoLSS / SSF), optionally fine-tune it on your
    private data (TTS / finetune, optional BiDO), and write a hardened model file."""
    from mishield.errors import BadInputError, UsageError
    from mishield.fileio import check_writable
    from mishield.models import load_model
    from mishield.recipes import recipe_defaults
    from mishield.surgery import plan_surgery

    r = recipe_defaults(ctx, recipe_file, RECIPE_KEYS)
    method, alpha, stage, sites = (r.get(k, v) for k, v in
                                   (("method", method), ("alpha", alpha), ("stage", stage), ("sites", sites)))
    schedule, epochs, stage1_epochs, lr, batch_size = (r.get(k, v) for k, v in (
        ("schedule", schedule), ("epochs", epochs), ("stage1_epochs", stage1_epochs), ("lr", lr),
        ("batch_size", batch_size)))
    bido, bido_lx, bido_ly, seed, val_fraction = (r.get(k, v) for k, v in (
        ("bido", bido), ("bido_lx", bido_lx), ("bido_ly", bido_ly), ("seed", seed), ("val_fraction", val_fraction)))
    if isinstance(sites, str):
        sites = [sites]

    if method not in ("rolss", "ssf"):
        raise UsageError(f"--method must be rolss or ssf, not {method!r}.")
    if alpha is not None and method == "rolss":
        raise UsageError("--alpha applies to --method ssf only (rolss is ssf with k = 0).")
    if schedule is not None and schedule not in ("tts", "finetune"):
        raise UsageError(f"--schedule must be tts or finetune, not {schedule!r}.")
    if data is None:
        given = [flag for flag, value in (
            ("--val-data", val_data), ("--val-fraction", val_fraction), ("--schedule", schedule),
            ("--stage1-epochs", stage1_epochs), ("--lr", lr), ("--bido", bido or None), ("--resume", resume or None),
            ("--reset-head", reset_head or None), ("--compile", compile_model or None),
        ) if value is not None]
        if epochs:
            given.insert(0, "--epochs")
        if given:
            raise UsageError(f"{given[0]} needs training data; pass --data DIR (an ImageFolder of your private images).")
    if schedule == "finetune" and stage1_epochs is not None:
        raise UsageError("--stage1-epochs applies to --schedule tts only.")
    check_writable(out, overwrite, inputs=(model, data, val_data, recipe_file))
    state_path, log_path = state_path_for(out), log_path_for(out)
    if data is not None and state_path.exists() and not resume and not overwrite:
        raise UsageError(
            f"{state_path} holds an interrupted run; pass --resume to continue it or --overwrite to start over."
        )

    loaded = load_model(model, arch=arch, num_classes=num_classes, trust_checkpoint=trust_checkpoint,
                        input_size=input_size, mean=parse_floats(mean, "--mean"), std=parse_floats(std, "--std"))
    if not loaded.supports_surgery:
        raise BadInputError(
            f"{model} is a {loaded.kind} archive, which cannot be rewritten; harden the original checkpoint."
        )
    if data is None:
        _surgery_only(loaded, model, out, method, alpha, stage, sites, overwrite, json_output)
        return

    from mishield.data import check_num_classes, load_image_folders
    from mishield.training import BiDOConfig, TrainingRecipe, default_lr, run_schedule
    from mishield.training import reset_head as reset_classifier

    splits = load_image_folders(data, val_dir=val_data, val_fraction=val_fraction, seed=seed)
    model_classes = loaded.num_classes
    if reset_head:
        reset_classifier(loaded.model, splits.num_classes)
        model_classes = splits.num_classes
    else:
        check_num_classes(splits, model_classes)
    trained = loaded.kind != "spec"
    schedule = schedule or ("finetune" if trained else "tts")
    recipe = TrainingRecipe(
        schedule=schedule,
        epochs=DEFAULT_EPOCHS_WITH_DATA if epochs is None else epochs,
        stage1_epochs=5 if stage1_epochs is None else stage1_epochs,
        lr=lr if lr is not None else default_lr(trained, reset_head),
        batch_size=batch_size,
        seed=seed,
        bido=BiDOConfig(lx=bido_lx, ly=bido_ly) if bido else None,
    )
    plan = plan_surgery(loaded.model, method, alpha=alpha, stage=stage, sites=sites,
                        input_size=loaded.preprocessing.input_size)
    is_main = int(os.environ.get("RANK", "0")) == 0
    if is_main and not resume and overwrite:
        state_path.unlink(missing_ok=True)
        log_path.unlink(missing_ok=True)
    from mishield.cli.progress import epoch_printer, progress_bars

    with progress_bars(is_main) as bars:
        result = run_schedule(
            loaded.model, plan, splits, loaded.preprocessing, recipe, device=device, workers=workers,
            compile=compile_model, state_path=state_path, resume=resume, log_path=log_path,
            progress=bars, on_epoch=epoch_printer(is_main), num_classes=model_classes,
        )
    if not is_main:
        return
    _write_trained(loaded, out, result, splits, model_classes, overwrite)
    state_path.unlink(missing_ok=True)  # the finished model supersedes the resumable state
    summary = _training_summary(out, log_path, plan, result, splits, resume)
    if json_output:
        console.emit_json(summary)
        return
    _print_training_summary(summary)


def _surgery_only(loaded, model, out, method, alpha, stage, sites, overwrite, json_output) -> None:
    from mishield.models import save_model
    from mishield.surgery import apply_plan, plan_surgery

    plan = plan_surgery(loaded.model, method, alpha=alpha, stage=stage, sites=sites,
                        input_size=loaded.preprocessing.input_size)
    result = apply_plan(loaded.model, plan)
    previous = list((loaded.recipe or {}).get("surgery") or [])
    save_model(
        out, result.model, arch=loaded.arch, num_classes=loaded.num_classes,
        surgery=previous + [result.spec], preprocessing=loaded.preprocessing,
        source=loaded.source, overwrite=overwrite,
    )
    summary = {
        "out": str(out),
        "method": method,
        "alpha": plan.alpha,
        "selection": plan.selection,
        "sites": plan.selected,
        "dropped_parameters": result.dropped_parameters,
        "surgery_seconds": round(result.seconds, 3),
    }
    if json_output:
        console.emit_json(summary)
        return
    console.err.print(
        f"{method} on {plan.selection}: {len(plan.selected)} skip site(s) rewritten"
        + (f", alpha={plan.alpha}" if method == "ssf" else "")
        + (f", {len(result.dropped_parameters)} dead tensor(s) dropped" if result.dropped_parameters else "")
        + f" in {result.seconds:.2f}s -> [bold]{out}[/]"
    )


def _write_trained(loaded, out: Path, result, splits, num_classes: int, overwrite: bool) -> None:
    from mishield.models import save_model

    previous = list((loaded.recipe or {}).get("surgery") or [])
    training = result.training_record() | {"classes": list(splits.classes), "train_images": len(splits.train),
                                           "val_images": len(splits.val), "bido_features": result.bido_features}
    save_model(
        out, result.model, arch=loaded.arch, num_classes=num_classes,
        surgery=previous + [result.surgery.spec], preprocessing=loaded.preprocessing,
        source=loaded.source, overwrite=overwrite,
        extra={"training": training, "metrics": {k: result.metrics.get(k) for k in
                                                 ("natural_acc_before", "natural_acc_after_surgery", "natural_acc_after")}},
    )


def _training_summary(out: Path, log_path: Path, plan, result, splits, resumed: bool) -> dict:
    final = result.history[-1] if result.history else {}
    return {
        "out": str(out),
        "log": str(log_path),
        "method": plan.method,
        "alpha": plan.alpha,
        "selection": plan.selection,
        "sites": plan.selected,
        "dropped_parameters": result.surgery.dropped_parameters,
        "schedule": result.recipe.schedule,
        "recipe": result.recipe.to_dict(),
        "classes": splits.classes,
        "train_images": len(splits.train),
        "val_images": len(splits.val),
        "metrics": result.metrics,
        "epochs": result.history,
        "final_train_loss": final.get("train_loss"),
        "bido_features": result.bido_features,
        "resumed_from": result.resumed_from,
        "seconds": round(result.seconds, 2),
    }


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f} %"


def _print_training_summary(s: dict) -> None:
    from rich.table import Table

    shown = s["epochs"][-SUMMARY_EPOCHS:]
    hidden = len(s["epochs"]) - len(shown)
    epochs = Table(title=f"{s['schedule']} fine-tuning ({s['method']} on {s['selection']})", title_justify="left",
                   caption=f"{hidden} earlier epoch(s) in {s['log']}" if hidden else None, caption_justify="left")
    for col in ("stage", "epoch", "loss", "train acc", "val acc", "lr", "img/s"):
        epochs.add_column(col, justify="right" if col != "stage" else "left")
    bido = any(h.get("hsic_x") is not None for h in s["epochs"])
    if bido:
        epochs.add_column("HSIC(X,Z)", justify="right")
        epochs.add_column("HSIC(Y,Z)", justify="right")
    for h in shown:
        row = [h["stage"], str(h["epoch"]), f"{h['train_loss']:.4f}", _pct(h["train_acc"]), _pct(h["val_acc"]),
               f"{h['lr']:.2g}", f"{h['images_per_s']:.0f}"]
        if bido:
            row += [f"{h['hsic_x']:.3g}", f"{h['hsic_y']:.3g}"]
        epochs.add_row(*row)
    if s["epochs"]:
        console.err.print(epochs)
    m = s["metrics"]
    acc = Table(title="natural accuracy on the validation images", title_justify="left")
    acc.add_column("before")
    acc.add_column("after surgery")
    acc.add_column("after fine-tuning")
    acc.add_row(_pct(m.get("natural_acc_before")), _pct(m.get("natural_acc_after_surgery")),
                _pct(m.get("natural_acc_after")))
    console.err.print(acc)
    console.err.print(f"{len(s['sites'])} skip site(s) rewritten, {s['train_images']} training images, "
                      f"{s['seconds']:.1f}s -> [bold]{s['out']}[/] (log: {s['log']})")
