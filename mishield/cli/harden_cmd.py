"""`mishield harden MODEL --method rolss|ssf --out FILE [--data DIR ...]`: rewrite the last stage's
skips and, given private training data, fine-tune the rewritten model (TTS or finetune) with the
defences stacked on it (BiDO, --neg-ls, --erase, --freeze-stages, TL-DMI with --public)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mishield.cli import console
from mishield.cli.harden_search import (
    SEARCH_FLAGS,
    AllowWeakEvaluatorOpt,
    EvalArchOpt,
    EvalModelOpt,
    GridOpt,
    MaxAccDropOpt,
    PriorOpt,
    RemeasureOpt,
    SearchEpochsOpt,
    SearchOpt,
    SearchPresetOpt,
    refuse_search_options,
    run_search,
)
from mishield.cli.options import (
    LOAD_PARAMETERS,
    MAX_BATCH_SIZE,
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
    flags_in_errors,
    parse_floats,
)
from mishield.hardening import DEFAULT_EPOCHS_WITH_DATA

SUMMARY_EPOCHS = 12  # rows of the per-epoch table; the JSON-lines log has them all
TRAINING_PANEL = "Fine-tuning (needs --data)"
DEFENCE_PANEL = "Defences stacked on the surgery (need --data)"


# Options a --recipe file may set (the training recipe and the surgery it applies).
RECIPE_KEYS = ("method", "alpha", "stage", "sites", "schedule", "epochs", "stage1_epochs", "lr", "batch_size",
               "bido", "bido_lx", "bido_ly", "seed", "val_fraction", "neg_ls", "neg_ls_start", "neg_ls_ramp", "erase",
               "freeze_stages", "public_epochs")


# HardenConfig's fields, by the flag that sets each (messages name the fields in backticks).
CONFIG_FLAGS = (*RECIPE_KEYS, "overwrite", "device", "workers", "compile", "reset_head", "resume", "data", "val_data", "public",
                "out", "force")


# Options only `harden` has (shared ones are in mishield.cli.options).
OutOpt = Annotated[Path, typer.Option("--out", help="Where to write the hardened model file.")]
MethodOpt = Annotated[str, typer.Option("--method", help="rolss (remove skips) or ssf (scale skips by --alpha).")]
AlphaOpt = Annotated[
    float | None,
    typer.Option("--alpha", min=0.0, max=1.0, help="SSF scale k (default 0.2 additive, 0.01 concatenative)."),
]
EpochsOpt = Annotated[
    int | None,
    typer.Option("--epochs", min=0, show_default=False, rich_help_panel=TRAINING_PANEL,
                 help=f"Fine-tuning epochs after surgery (TTS stage 2). Default: {DEFAULT_EPOCHS_WITH_DATA} "
                      "with --data, else 0 (surgery only)."),
]
DataOpt = Annotated[
    Path | None,
    typer.Option("--data", rich_help_panel=TRAINING_PANEL,
                 help="Private training images: an ImageFolder (one sub-folder per class), or a folder "
                      "with train/ and val/ ImageFolders."),
]
ValDataOpt = Annotated[
    Path | None,
    typer.Option("--val-data", rich_help_panel=TRAINING_PANEL,
                 help="Validation ImageFolder (default: DATA/val, or --val-fraction of DATA)."),
]
ValFractionOpt = Annotated[
    float | None,
    typer.Option("--val-fraction", min=0.0, max=1.0, rich_help_panel=TRAINING_PANEL,
                 help="Hold out this fraction of each class of DATA for validation (seeded by --seed)."),
]
ScheduleOpt = Annotated[
    str | None,
    typer.Option("--schedule", show_default=False, rich_help_panel=TRAINING_PANEL,
                 help="tts (stage 1 with full skips, then surgery + stage 2) or finetune (surgery, then "
                      "train). Default: finetune for a trained checkpoint (its training was stage 1), "
                      "tts for an untrained architecture spec."),
]
Stage1EpochsOpt = Annotated[
    int | None,
    typer.Option("--stage1-epochs", min=0, show_default=False, rich_help_panel=TRAINING_PANEL,
                 help="TTS stage-1 epochs with full skips (default 5, the paper's)."),
]
LrOpt = Annotated[
    float | None,
    typer.Option("--lr", min=0.0, show_default=False, rich_help_panel=TRAINING_PANEL,
                 help="Adam learning rate (default 1e-4 for a trained checkpoint, the recipe's 1e-3 for "
                      "random weights or --reset-head); decays x0.1 at 75% and 90% of all epochs."),
]
BatchSizeOpt = Annotated[
    int, typer.Option("--batch-size", min=1, max=MAX_BATCH_SIZE, rich_help_panel=TRAINING_PANEL, help="Images per step (per GPU under torchrun).")
]
BidoOpt = Annotated[
    bool, typer.Option("--bido", rich_help_panel=TRAINING_PANEL,
                       help="Add BiDO's HSIC terms over the stem and stage outputs to the loss.")
]
BidoLxOpt = Annotated[
    float, typer.Option("--bido-lx", min=0.0, rich_help_panel=TRAINING_PANEL, help="BiDO weight of HSIC(input, feature).")
]
BidoLyOpt = Annotated[
    float, typer.Option("--bido-ly", min=0.0, rich_help_panel=TRAINING_PANEL, help="BiDO weight of HSIC(label, feature).")
]
ResumeOpt = Annotated[
    bool, typer.Option("--resume", rich_help_panel=TRAINING_PANEL,
                       help="Continue an interrupted run from OUT.train-state (same command otherwise).")
]
SeedOpt = Annotated[int, typer.Option("--seed", rich_help_panel=TRAINING_PANEL, help="Seed for data order, augmentation and splits.")]
DeviceOpt = Annotated[
    str, typer.Option("--device", rich_help_panel=TRAINING_PANEL, help="auto (CUDA when present), cpu, cuda or cuda:N.")
]
CompileModelOpt = Annotated[
    bool, typer.Option("--compile", rich_help_panel=TRAINING_PANEL, help="torch.compile the model (faster steps after a slow first one).")
]
ResetHeadOpt = Annotated[
    bool, typer.Option("--reset-head", rich_help_panel=TRAINING_PANEL,
                       help="Replace the classifier with a new one for DATA's classes.")
]
ForceOpt = Annotated[
    bool, typer.Option("--force", rich_help_panel=TRAINING_PANEL,
                       help="Fine-tune even an original that scores at chance on the validation images (likely a wrong "
                            "--mean/--std, --input-size or class order), or one class with --reset-head.")
]
WorkersOpt = Annotated[
    int | None, typer.Option("--workers", min=0, rich_help_panel=TRAINING_PANEL,
                                help="Data-loading worker processes (default: up to 8 on CUDA, 0 on small CPUs).")
]
NegLsOpt = Annotated[
    float | None,
    typer.Option("--neg-ls", metavar="ALPHA", show_default=False, rich_help_panel=DEFENCE_PANEL,
                 help="Negative label smoothing with factor ALPHA in (-1, 0) (Struppek et al., ICLR 2024: -0.05); "
                      "0 for the first half of the run, then ramped in over a quarter (recorded in the output)."),
]
NegLsStartOpt = Annotated[
    int | None,
    typer.Option("--neg-ls-start", min=0, show_default=False, rich_help_panel=DEFENCE_PANEL,
                 help="Global epoch (0-based, TTS stage 1 included) at which --neg-ls starts (default: half the run)."),
]
NegLsRampOpt = Annotated[
    int | None,
    typer.Option("--neg-ls-ramp", min=0, show_default=False, rich_help_panel=DEFENCE_PANEL,
                 help="Epochs over which --neg-ls grows linearly to ALPHA (default: a quarter of the run)."),
]
EraseOpt = Annotated[
    str | None,
    typer.Option("--erase", metavar="P[,MIN,MAX]", show_default=False, rich_help_panel=DEFENCE_PANEL,
                 help="Random erasing of training images (MIDRE): probability P, erased area MIN-MAX of the image "
                      "(default 0.1-0.8); MIDRE uses 1.0,0.1,0.8."),
]
FreezeStagesOpt = Annotated[
    int, typer.Option("--freeze-stages", min=0, metavar="N", rich_help_panel=DEFENCE_PANEL,
                      help="Keep the stem and the first N stages frozen (batch-norm statistics included) while training "
                           "on the private data (TL-DMI); 0 freezes nothing.")
]
PublicOpt = Annotated[
    Path | None,
    typer.Option("--public", show_default=False, rich_help_panel=DEFENCE_PANEL,
                 help="Public ImageFolder (classes disjoint from the private ones). With --freeze-stages: TL-DMI, the "
                      "whole model pre-trained on it first, then a new head and the usual hardening with the first N "
                      "stages frozen. With --search: the attacker's data the audit's prior is trained on."),
]
PublicEpochsOpt = Annotated[
    int | None,
    typer.Option("--public-epochs", min=1, show_default=False, rich_help_panel=DEFENCE_PANEL,
                 help="Epochs of TL-DMI's public pre-training (default 10)."),
]
RecipeFileOpt = Annotated[
    Path | None,
    typer.Option("--recipe", help="YAML file of defaults for these options (e.g. recipes/paper-tts.yaml); "
                                  "flags given on the command line win."),
]


def harden(
    ctx: typer.Context,
    model: ModelArg,
    out: OutOpt,
    method: MethodOpt = "rolss",
    alpha: AlphaOpt = None,
    epochs: EpochsOpt = None,
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
    data: DataOpt = None,
    val_data: ValDataOpt = None,
    val_fraction: ValFractionOpt = None,
    schedule: ScheduleOpt = None,
    stage1_epochs: Stage1EpochsOpt = None,
    lr: LrOpt = None,
    batch_size: BatchSizeOpt = 128,
    bido: BidoOpt = False,
    bido_lx: BidoLxOpt = 0.05,
    bido_ly: BidoLyOpt = 0.5,
    resume: ResumeOpt = False,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    compile_model: CompileModelOpt = False,
    reset_head: ResetHeadOpt = False,
    force: ForceOpt = False,
    workers: WorkersOpt = None,
    neg_ls: NegLsOpt = None,
    neg_ls_start: NegLsStartOpt = None,
    neg_ls_ramp: NegLsRampOpt = None,
    erase: EraseOpt = None,
    freeze_stages: FreezeStagesOpt = 0,
    public: PublicOpt = None,
    public_epochs: PublicEpochsOpt = None,
    search: SearchOpt = False,
    max_acc_drop: MaxAccDropOpt = 0.02,
    search_epochs: SearchEpochsOpt = 2,
    grid: GridOpt = "default",
    search_preset: SearchPresetOpt = "ci",
    prior: PriorOpt = None,
    eval_model: EvalModelOpt = None,
    eval_arch: EvalArchOpt = None,
    allow_weak_evaluator: AllowWeakEvaluatorOpt = False,
    remeasure: RemeasureOpt = True,
    recipe_file: RecipeFileOpt = None,
) -> None:
    """Rewrite the model's last-stage skips (RoLSS / SSF), optionally fine-tune it on your private data
    with stacked defences (BiDO, negative label smoothing, random erasing, frozen stages, TL-DMI) and
    write a hardened model file; or (--search) find the least leaky stack within an accuracy budget."""
    from mishield.cli.progress import epoch_printer, progress_bars
    from mishield.hardening import HardenConfig
    from mishield.hardening import harden as harden_model
    from mishield.recipes import recipe_defaults

    # every option by name (RECIPE_KEYS, SEARCH_FLAGS); an unused repeatable option is () there, None here
    given = {k: (None if v == () else v) for k, v in ctx.params.items()}
    r = recipe_defaults(ctx, recipe_file, RECIPE_KEYS)
    options = {k: r.get(k, given[k]) for k in RECIPE_KEYS}
    _refuse_recipe_as_output(out, recipe_file)  # the library checks the inputs it is given itself
    is_main = _is_main()  # under torchrun only rank 0 reports
    run = {"overwrite": overwrite, "device": device, "workers": workers, "compile": compile_model, "force": force}
    with flags_in_errors(harden_model, extra=(*LOAD_PARAMETERS, *CONFIG_FLAGS)):
        refuse_search_options(ctx, search)
        load = _load_options(given)
    if search:
        chosen = {k: given[k] for k in SEARCH_FLAGS}
        return run_search(model, out, {**options, **run}, load, data, public, chosen, json_output, set(r), CONFIG_FLAGS)
    with flags_in_errors(harden_model, extra=(*LOAD_PARAMETERS, *CONFIG_FLAGS)), progress_bars(is_main and data is not None) as bars:
        config = HardenConfig(**options, **run, reset_head=reset_head, resume=resume)
        result = harden_model(model, config=config, data=data, val_data=val_data, public=public, out=out, progress=bars,
                              on_epoch=epoch_printer(is_main), load_options=load)
    if result.main_process:
        _print_result(result, json_output)


def _refuse_recipe_as_output(out: Path, recipe_file: Path | None) -> None:
    """The --recipe file is an input the library never sees: neither --out nor a file beside it may be it."""
    from mishield.fileio import check_side_file, refuse_input_as_output
    from mishield.hardening import side_files_for

    refuse_input_as_output(out, (recipe_file,))
    for side in side_files_for(out):
        check_side_file(side, (recipe_file,))


def _is_main() -> bool:
    from mishield.launch import torchrun_launch

    return torchrun_launch().is_main


def _load_options(given: dict) -> dict:
    """What `load_model` gets for MODEL: the shared loading flags, --mean / --std as numbers."""
    load = {k: given[k] for k in ("arch", "num_classes", "trust_checkpoint", "input_size")}
    return load | {"mean": parse_floats(given["mean"], "--mean"), "std": parse_floats(given["std"], "--std")}


def _print_result(result, json_output: bool) -> None:
    summary = result.to_dict()
    if json_output:
        console.emit_json(summary)
    elif result.training is None:
        _print_surgery_summary(summary, result.surgery.seconds)
    else:
        _print_training_summary(summary)


def _print_surgery_summary(s: dict, seconds: float) -> None:
    console.err.print(
        f"{s['method']} on {s['selection']}: {len(s['sites'])} skip site(s) rewritten"
        + (f", alpha={s['alpha']}" if s["method"] == "ssf" else "")
        + (f", {len(s['dropped_parameters'])} dead tensor(s) dropped" if s["dropped_parameters"] else "")
        + f" in {seconds:.2f}s -> [bold]{s['out']}[/]"
    )


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
    if s.get("defences"):
        console.err.print(f"defences stacked on the surgery: {', '.join(s['defences'])} (settings in the recipe: --json)")
    console.err.print(f"{len(s['sites'])} skip site(s) rewritten, {s['train_images']} training images, "
                      f"{s['seconds']:.1f}s -> [bold]{s['out']}[/] (log: {s['log']})")
