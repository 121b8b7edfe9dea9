"""`harden`: skip-connection surgery (RoLSS / SSF) and, given private data, fine-tuning (TTS or
finetune) in one call, returning a typed `HardenResult`. The defences that change the loss or the
data stack on top of the surgery, on the one training loop: BiDO, negative label smoothing
(`neg_ls`), random erasing (`erase`), partial freezing (`freeze_stages`) and, given `public`
data, TL-DMI's public pre-training of the frozen stages (docs/architecture.md §4).

This is the policy layer `mishield harden` calls: defaults (schedule, learning rate, epochs),
validation, the resumable-state and log files beside the output, and the training record written
into the hardened model file all live here, once (docs/architecture.md §2).

Errors name *parameters* in backticks (`` `alpha` must lie in [0, 1] ``); the CLI swaps each for
its flag (`--alpha`), so the same check reads right from Python and from the shell.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mishield.configs import resolve_config
from mishield.errors import BadInputError, UsageError
from mishield.launch import torchrun_launch
from mishield.progress import EpochCallback, ProgressCallback

if TYPE_CHECKING:  # torch-heavy types, named for readers and type checkers only
    from torch import nn

    from mishield.models import LoadedModel
    from mishield.surgery import SurgeryPlan, SurgeryResult
    from mishield.training import TrainingRecipe

SCHEDULES = ("tts", "finetune")
DEFAULT_EPOCHS_WITH_DATA = 10
DEFAULT_STAGE1_EPOCHS = 5  # the paper's M
DEFAULT_PUBLIC_EPOCHS = 10  # TL-DMI's public pre-training, when `public_epochs` is not given
# "At chance": the upper end of the original's accuracy interval within this share of the way from
# chance to perfect (chance + 0.15 (1 - chance): 32 % for 5 classes, 23.5 % for 10, 57.5 % for 2).
NEAR_CHANCE_SHARE = 0.15


def state_path_for(out: Path) -> Path:
    """The resumable training state written beside the output while training runs (the one
    naming rule of every trainer, `mishield.training.state_path_for`; imported late: torch)."""
    from mishield.training import state_path_for as rule

    return rule(out)


def public_state_path_for(out: Path) -> Path:
    """TL-DMI's public pre-training keeps its own resumable state beside the output's."""
    state = state_path_for(out)
    return state.with_name(state.name + ".public")


def log_path_for(out: Path) -> Path:
    """The JSON-lines training log written beside the output."""
    out = Path(out)
    return out.with_name(out.name + ".train.jsonl")


@dataclass
class HardenResult:
    """What `harden` did. `to_dict()` is the document `mishield harden --json` prints."""

    model: nn.Module  # the rewritten (and, with data, fine-tuned) model, on the CPU, in eval mode
    plan: SurgeryPlan
    surgery: SurgeryResult
    out: Path | None = None  # the hardened model file, when one was written
    training: dict | None = None  # the record written under "training" in the model file; None: surgery only
    recipe: TrainingRecipe | None = None  # the resolved fine-tuning recipe (defaults filled in)
    metrics: dict = field(default_factory=dict)  # natural accuracy before / after surgery / after fine-tuning
    history: list[dict] = field(default_factory=list)  # one row per epoch
    log: Path | None = None
    resumed_from: dict | None = None
    seconds: float = 0.0
    main_process: bool = True  # False on the other ranks under torchrun, which write nothing
    pretraining: dict | None = None  # TL-DMI's public pre-training (public classes, epochs, accuracy), when run

    @property
    def accuracy_before(self) -> float | None:
        return self.metrics.get("natural_acc_before")

    @property
    def accuracy_after(self) -> float | None:
        return self.metrics.get("natural_acc_after")

    def to_dict(self) -> dict[str, Any]:
        head = {
            "out": None if self.out is None else str(self.out),
            **({"log": None if self.log is None else str(self.log)} if self.training is not None else {}),
            "method": self.plan.method,
            "alpha": self.plan.alpha,
            "selection": self.plan.selection,
            "sites": self.plan.selected,
            "dropped_parameters": self.surgery.dropped_parameters,
        }
        if self.training is None:
            return head | {"surgery_seconds": round(self.surgery.seconds, 3)}
        t = self.training
        final = self.history[-1] if self.history else {}
        return head | {
            "schedule": self.recipe.schedule,
            "recipe": self.recipe.to_dict(),
            "classes": t["classes"],
            "train_images": t["train_images"],
            "val_images": t["val_images"],
            "metrics": self.metrics,
            "epochs": self.history,
            "final_train_loss": final.get("train_loss"),
            "bido_features": t["bido_features"],
            "defences": defences(self.recipe, self.pretraining),
            "public_pretraining": self.pretraining,
            "resumed_from": self.resumed_from,
            "seconds": round(self.seconds, 2),
        }


def defences(recipe: TrainingRecipe, pretraining: dict | None = None) -> list[str]:
    """The loss and data defences a recipe trains with, by name, in a fixed order (for readers;
    the recipe holds their settings)."""
    names = [("bido", recipe.bido is not None), ("neg_ls", recipe.label_smoothing is not None),
             ("erase", recipe.erase is not None), ("freeze_stages", bool(recipe.freeze_stages)),
             ("tl_dmi", pretraining is not None)]
    return [name for name, on in names if on]


@dataclass(frozen=True)
class HardenConfig:
    """How to harden: which skips change and how, and (with data) how to fine-tune.

    Surgery: `method` rolss or ssf, `alpha` SSF's k (default 0.2 additive, 0.01 concatenative),
    `stage` (resolution stage, default the last) or `sites` (globs over skip-site names). Fine-tuning
    (needs `data`): `schedule` tts or finetune (default finetune for a trained checkpoint, tts for
    an untrained spec), `epochs` (N, default 10), `stage1_epochs` (TTS's M, default 5), `lr` (default
    1e-4 for a trained checkpoint, 1e-3 for random weights or `reset_head`), `batch_size`, BiDO
    (`bido`, `bido_lx`, `bido_ly`), `seed`, `device`, `workers`, `compile`, `reset_head`, `resume`
    (continue OUT.train-state), `val_fraction` (a seeded hold-out where the data has no val/).
    Defences stacked on the surgery (each needs `data`): `neg_ls` (negative label smoothing's
    factor, e.g. -0.05, Struppek et al., ICLR 2024; 0 until `neg_ls_start`, then ramped in over
    `neg_ls_ramp` epochs, by default half the run and a quarter), `erase` (random erasing, MIDRE:
    (p, min_area, max_area), or p alone, or the string "P[,MIN,MAX]"; MIDRE's is (1.0, 0.1, 0.8)),
    `freeze_stages` (the stem and the first N stages frozen in every stage that trains on the
    private data, TL-DMI), `public_epochs` (TL-DMI's public pre-training, with `harden(public=...)`).
    `augmentation` names the training augmentation (`mishield.data.AUGMENTATIONS`: "photo", the
    default, or "glyph" for drawn characters such as Omniglot's).
    `force` fine-tunes even an original that scores at chance on the validation images (by default a
    refusal, exit 3: its mean/std, input size or class order is likely wrong) or, with `reset_head`,
    data of one class. `overwrite` replaces an existing output. `HardenConfig.from_recipe("recipes/paper-tts.yaml")`
    reads a recipe file; `HardenConfig.paper_tts()` is the paper's full TTS recipe.
    """

    method: str = "rolss"
    alpha: float | None = None
    stage: int | None = None
    sites: tuple[str, ...] | None = None
    schedule: str | None = None
    epochs: int | None = None
    stage1_epochs: int | None = None
    lr: float | None = None
    batch_size: int = 128
    bido: bool = False
    bido_lx: float = 0.05
    bido_ly: float = 0.5
    seed: int = 0
    device: str = "auto"
    workers: int | None = None
    compile: bool = False
    reset_head: bool = False
    resume: bool = False
    overwrite: bool = False
    val_fraction: float | None = None
    neg_ls: float | None = None
    neg_ls_start: int | None = None
    neg_ls_ramp: int | None = None
    erase: tuple[float, float, float] | None = None
    freeze_stages: int = 0
    public_epochs: int | None = None
    force: bool = False
    augmentation: str = "photo"

    def __post_init__(self) -> None:
        from mishield.defences import parse_erase

        object.__setattr__(self, "erase", parse_erase(self.erase))
        if isinstance(self.sites, str):
            object.__setattr__(self, "sites", (self.sites,))
        elif self.sites is not None:
            object.__setattr__(self, "sites", tuple(self.sites))
        self.validate()

    @classmethod
    def paper_tts(cls, **changes) -> HardenConfig:
        """Koh et al.'s TTS recipe: 5 epochs with full skips, surgery, 95 more (Adam 1e-3, batch 128)."""
        return cls(**{"schedule": "tts", "stage1_epochs": 5, "epochs": 95, "lr": 1e-3, **changes})

    @classmethod
    def from_recipe(cls, path: str | Path, **changes) -> HardenConfig:
        """A recipe file's values (recipes/*.yaml: the keys are these fields), with `changes` on top."""
        from mishield.recipes import load_recipe

        recipe = load_recipe(Path(path))
        unknown = sorted(set(recipe) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise BadInputError(f"recipe {path} has unknown key(s) {', '.join(unknown)}.")
        return cls(**{**recipe, **changes})

    def replace(self, **changes) -> HardenConfig:
        return dataclasses.replace(self, **changes)

    def validate(self) -> HardenConfig:
        from mishield.defences import check_count, check_neg_ls
        from mishield.surgery.methods import check_method

        check_method(self.method, self.alpha)
        check_neg_ls(self.neg_ls)
        for name in ("neg_ls_start", "neg_ls_ramp", "freeze_stages", "public_epochs"):
            check_count(name, getattr(self, name), 1 if name == "public_epochs" else 0)
        if self.neg_ls is None and (self.neg_ls_start is not None or self.neg_ls_ramp is not None):
            raise UsageError("`neg_ls_start` and `neg_ls_ramp` schedule negative label smoothing; pass `neg_ls` too.")
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise UsageError(f"`schedule` must be tts or finetune, not {self.schedule!r}.")
        for name in ("epochs", "stage1_epochs", "workers"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise UsageError(f"`{name}` must be 0 or more, got {value}.")
        if self.batch_size < 1:
            raise UsageError(f"`batch_size` must be at least 1, got {self.batch_size}.")
        if self.lr is not None and not self.lr > 0:
            raise UsageError(f"`lr` must be a positive number, got {self.lr}.")
        if self.bido_lx < 0 or self.bido_ly < 0:
            raise UsageError("`bido_lx` and `bido_ly` must be 0 or more.")
        if self.schedule == "finetune" and self.stage1_epochs is not None:
            raise UsageError("`stage1_epochs` applies to `schedule` tts only.")
        from mishield.training.recipe import AUGMENTATION_NAMES

        if self.augmentation not in AUGMENTATION_NAMES:
            raise UsageError(f"`augmentation` must be one of {', '.join(AUGMENTATION_NAMES)}, got {self.augmentation!r}.")
        return self

    def training_options_given(self) -> list[str]:
        """The fine-tuning fields set away from their defaults (an error without data)."""
        return [name for name, value in (
            ("epochs", self.epochs or None), ("val_fraction", self.val_fraction), ("schedule", self.schedule),
            ("stage1_epochs", self.stage1_epochs), ("lr", self.lr), ("bido", self.bido or None),
            ("resume", self.resume or None), ("reset_head", self.reset_head or None), ("compile", self.compile or None),
            ("neg_ls", self.neg_ls), ("neg_ls_start", self.neg_ls_start), ("neg_ls_ramp", self.neg_ls_ramp),
            ("erase", self.erase), ("freeze_stages", self.freeze_stages or None), ("public_epochs", self.public_epochs),
            ("force", self.force or None),
            ("augmentation", None if self.augmentation == "photo" else self.augmentation),
        ) if value is not None]


def harden(
    model: str | Path | LoadedModel,
    *,
    config: HardenConfig | None = None,
    data: str | Path | None = None,
    val_data: str | Path | None = None,
    public: str | Path | None = None,
    out: str | Path | None = None,
    progress: ProgressCallback | None = None,
    on_epoch: EpochCallback | None = None,
    load_options: dict | None = None,
    **keywords,
) -> HardenResult:
    """Rewrite `model`'s last-stage skips (or `config.stage` / `config.sites`) and, given `data`, fine-tune it.

    `model` is a `LoadedModel` or anything `mishield.load_model` reads (a file or an architecture
    spec, loaded with `load_options`). `config` (`HardenConfig`) says how. Without `data` only the
    surgery runs. With it the model is fine-tuned on the private ImageFolder `data` (validated on
    `val_data`, its val/ folder, or a seeded hold-out). `public` (an ImageFolder of public images,
    with `config.freeze_stages`) is TL-DMI: the whole model is first trained on the public classes
    for `config.public_epochs` through a temporary head, then gets a fresh head for the private
    classes and is hardened as usual with its first stages frozen at their public weights.
    `progress(stage, step, steps)` and `on_epoch(record)` report the training
    (`mishield.progress`; the main process only). `out` (optional) receives a mishield model file
    that reloads with no options; while training, `OUT.train-state` (for `config.resume`; and
    `OUT.train-state.public` during TL-DMI's pre-training) and `OUT.train.jsonl` sit beside it.

    The former keyword form (`method=`, `epochs=`, ...) still works for one release, with a
    DeprecationWarning.
    """
    config = resolve_config("harden", config, keywords, HardenConfig)
    _check_call(config, data, val_data, public, out)
    out = Path(out) if out is not None else None
    with _claimed(out, config, (model, data, val_data, public), trains=data is not None):
        loaded = _load(model, load_options)
        if data is None:
            return _surgery_only(loaded, config, out)
        # what the caller chose: a LoadedModel's preprocessing all of it, a file's load options what they set
        chosen = {"input_size", "mean", "std"}
        given = {k for k, v in (load_options or {}).items() if v is not None} if isinstance(model, (str, Path)) else chosen
        where = _Data(Path(data), None if val_data is None else Path(val_data), "input_size" in given,
                      None if public is None else Path(public), bool(given & {"mean", "std"}))
        return _fine_tune(loaded, config, where, out, Callbacks(progress, on_epoch))


def side_files_for(out: Path) -> tuple[Path, ...]:
    """What a fine-tuning `harden` writes, appends to or deletes beside `out`: the resumable states
    (the private run's and TL-DMI's public one) and the training log."""
    return state_path_for(out), public_state_path_for(out), log_path_for(out)


@contextlib.contextmanager
def _claimed(out: Path | None, config: HardenConfig, inputs: tuple, trains: bool) -> Iterator[None]:
    """`out` and (when training) its side files checked against every input and locked for the run
    (`mishield.fileio.claim_output`); then a leftover interrupted run is refused unless resumed or overwritten."""
    if out is None:
        yield
        return
    from mishield.fileio import claim_output

    with claim_output(out, config.overwrite, inputs, side_files_for(out) if trains else ()):
        if trains and not config.resume and not config.overwrite:
            for state in (state_path_for(out), public_state_path_for(out)):
                if state.exists():
                    raise UsageError(f"{state} holds an interrupted run; pass `resume` to continue it or `overwrite` to start over.")
        yield


def _check_call(config: HardenConfig, data, val_data, public, out) -> None:
    """What `harden` refuses from its arguments alone: options that need data, TL-DMI's pairing of
    `public` with `freeze_stages`, `resume` without `out`, a partial torchrun environment."""
    torchrun_launch()
    if data is None:
        given = config.training_options_given() + [name for name, v in (("val_data", val_data), ("public", public)) if v is not None]
        if given:
            raise UsageError(f"`{given[0]}` needs training data; pass `data` (an ImageFolder of your private images).")
    if public is not None and not config.freeze_stages:
        raise UsageError("`public` pre-trains the early stages for TL-DMI, which then keeps them frozen; "
                         "pass `freeze_stages` (e.g. 2) too.")
    if config.public_epochs is not None and public is None:
        raise UsageError("`public_epochs` is the length of TL-DMI's public pre-training; pass `public` too.")
    if out is None and config.resume:
        raise UsageError("`resume` continues the run whose state sits beside `out`; pass `out` too.")


@dataclass(frozen=True)
class _Data:
    """The private data `harden` fine-tunes on (and TL-DMI's public data)."""

    train: Path
    val: Path | None
    input_size_given: bool  # False: a plain state dict whose resolution the data must tell
    public: Path | None = None
    normalisation_given: bool = True  # False: the mean/std are the architecture's defaults, said aloud


@dataclass(frozen=True)
class Callbacks:
    """The two ways the library reports training (`mishield.progress`); None is silent."""

    progress: ProgressCallback | None = None
    on_epoch: EpochCallback | None = None


def _load(model, load_options: dict | None) -> LoadedModel:
    from mishield.models import LoadedModel, load_model

    if isinstance(model, LoadedModel):
        loaded = model
    else:
        loaded = load_model(str(model), **(load_options or {}))
    if not loaded.supports_surgery:
        raise BadInputError(
            f"{loaded.source or model} is a {loaded.kind} archive, which cannot be rewritten; "
            "harden the original checkpoint."
        )
    return loaded


def _plan(loaded: LoadedModel, config: HardenConfig) -> SurgeryPlan:
    from mishield.surgery import plan_surgery

    return plan_surgery(loaded.model, config.method, alpha=config.alpha, stage=config.stage,
                        sites=None if config.sites is None else list(config.sites), input_size=loaded.preprocessing.input_size)


def _previous_surgery(loaded: LoadedModel) -> list:
    return list((loaded.recipe or {}).get("surgery") or [])


def _surgery_only(loaded: LoadedModel, config: HardenConfig, out: Path | None) -> HardenResult:
    from mishield.models import save_model
    from mishield.surgery import apply_plan

    plan = _plan(loaded, config)
    result = apply_plan(loaded.model, plan)
    if out is not None:
        save_model(
            out, result.model, arch=loaded.arch, num_classes=loaded.num_classes,
            surgery=_previous_surgery(loaded) + [result.spec], preprocessing=loaded.preprocessing,
            source=loaded.source, overwrite=config.overwrite,
        )
    return HardenResult(model=result.model, plan=plan, surgery=result, out=out, seconds=result.seconds)


def _recipe(loaded: LoadedModel, t: HardenConfig, fresh_head: bool = False) -> TrainingRecipe:
    """The fine-tuning recipe with its defaults filled in; `fresh_head` (`reset_head`, or TL-DMI's
    private head after public pre-training) takes the recipe's 1e-3 rather than 1e-4."""
    from mishield.training import BiDOConfig, LabelSmoothing, TrainingRecipe, default_lr

    trained = loaded.kind != "spec"
    smoothing = None if t.neg_ls is None else LabelSmoothing(t.neg_ls, t.neg_ls_start, t.neg_ls_ramp)
    return TrainingRecipe(
        schedule=t.schedule or ("finetune" if trained else "tts"),
        epochs=DEFAULT_EPOCHS_WITH_DATA if t.epochs is None else t.epochs,
        stage1_epochs=DEFAULT_STAGE1_EPOCHS if t.stage1_epochs is None else t.stage1_epochs,
        lr=t.lr if t.lr is not None else default_lr(trained, t.reset_head or fresh_head),
        batch_size=t.batch_size,
        seed=t.seed,
        bido=BiDOConfig(lx=t.bido_lx, ly=t.bido_ly) if t.bido else None,
        label_smoothing=smoothing,
        erase=t.erase,
        freeze_stages=t.freeze_stages,
        augmentation=t.augmentation,
    )


def _private_splits(loaded: LoadedModel, t: HardenConfig, data: _Data):
    """(the model at the data's resolution, the private splits, the class count it trains with)."""
    from mishield.data import (
        check_num_classes,
        fit_resolution,
        load_image_folders,
        resolve_val_fraction,
        state_normalisation,
    )
    from mishield.training import reset_head as reset_classifier

    fraction = resolve_val_fraction(data.train, data.val, t.val_fraction, val_data_option=True)
    splits = load_image_folders(data.train, val_dir=data.val, val_fraction=fraction, seed=t.seed)
    loaded = fit_resolution(loaded, splits.train, data.input_size_given)
    state_normalisation(loaded, data.normalisation_given)
    model_classes = loaded.num_classes
    if t.reset_head and splits.num_classes < 2 and not t.force:
        raise BadInputError(f"{data.train} has one class folder, so a new head (`reset_head`) has nothing to tell apart "
                            "and learns nothing; add the other classes' folders, or pass `force` to train anyway.")
    if t.reset_head:
        reset_classifier(loaded.model, splits.num_classes)
        model_classes = splits.num_classes
    elif data.public is None:  # TL-DMI gives the model a new private head after its public pre-training
        check_num_classes(splits, model_classes)
    return loaded, splits, splits.num_classes if data.public is not None else model_classes


def _pretrain_public(loaded: LoadedModel, t: HardenConfig, recipe: TrainingRecipe, data: _Data, private_classes: int,
                     options, report: Callbacks) -> dict:
    """TL-DMI step 1 on `loaded.model` in place (`mishield.training.pretrain_on_public`): the public
    classes through a temporary head, without the private run's defences, then a fresh private head."""
    import dataclasses as dc

    from mishield.data import load_image_folders
    from mishield.training import TrainingRecipe, pretrain_on_public

    public = load_image_folders(data.public, seed=t.seed)  # its val/ folder, when it has one, measures the public accuracy
    epochs = DEFAULT_PUBLIC_EPOCHS if t.public_epochs is None else t.public_epochs
    public_recipe = TrainingRecipe(schedule="finetune", epochs=epochs, lr=recipe.lr, batch_size=recipe.batch_size, seed=recipe.seed,
                                   augmentation=recipe.augmentation)
    state = None if options.state_path is None else options.state_path.with_name(options.state_path.name + ".public")
    pre = pretrain_on_public(loaded.model, public, loaded.preprocessing, public_recipe, private_classes=private_classes,
                             options=dc.replace(options, state_path=state, log_path=None),
                             progress=report.progress, on_epoch=report.on_epoch)
    loaded.model = pre.model
    return {"public": str(data.public), "lr": public_recipe.lr, **pre.to_dict()}


def _fine_tune(loaded: LoadedModel, t: HardenConfig, data: _Data, out: Path | None, report: Callbacks) -> HardenResult:
    from mishield.training import RunOptions, run_schedule

    loaded, splits, model_classes = _private_splits(loaded, t, data)
    recipe = _recipe(loaded, t, fresh_head=data.public is not None)
    state_path = log_path = None
    is_main = torchrun_launch().is_main  # torchrun: rank 0 alone writes files
    if out is not None:
        state_path, log_path = state_path_for(out), log_path_for(out)
        if is_main and not t.resume and t.overwrite:
            for stale in side_files_for(out):  # checked against the inputs by `_claimed`
                stale.unlink(missing_ok=True)
    checks = not (t.force or t.reset_head or loaded.kind == "spec" or data.public is not None)  # these start from no skill
    options = RunOptions(device=t.device, workers=t.workers, compile=t.compile, state_path=state_path, resume=t.resume,
                         log_path=log_path, check_before=_original_above_chance(loaded, splits.num_classes) if checks else None)
    if not is_main:
        report = Callbacks()
    pretraining = None
    if data.public is not None:
        pretraining = _pretrain_public(loaded, t, recipe, data, model_classes, options, report)
    plan = _plan(loaded, t)  # after pre-training: TL-DMI's private head is the one the surgery keeps
    result = run_schedule(loaded.model, plan, splits, loaded.preprocessing, recipe, options=options, num_classes=model_classes,
                          progress=report.progress, on_epoch=report.on_epoch)
    record = result.training_record() | {"classes": list(splits.classes), "train_images": len(splits.train),
                                         "val_images": len(splits.val), "bido_features": result.bido_features}
    if pretraining is not None:
        record["public_pretraining"] = pretraining
    metrics = {k: result.metrics.get(k) for k in ("natural_acc_before", "natural_acc_after_surgery", "natural_acc_after")}
    if is_main and out is not None:
        _write_trained(loaded, out, result, model_classes, t.overwrite, record, metrics)
        for finished in (state_path, public_state_path_for(out)):  # the finished model supersedes the resumable states
            finished.unlink(missing_ok=True)
    return HardenResult(
        model=result.model, plan=plan, surgery=result.surgery, out=out if is_main else None, training=record,
        recipe=recipe, metrics=result.metrics, history=result.history, log=log_path, resumed_from=result.resumed_from,
        seconds=result.seconds, main_process=is_main, pretraining=pretraining,
    )


def _original_above_chance(loaded: LoadedModel, num_classes: int):
    """The `RunOptions.check_before` that refuses (exit 3, before any training) an original which
    scores at chance on the validation images: fine-tuning would retrain it under statistics it
    never saw and call the result hardened (a mean/std 0.5 model read with ImageNet's scored 20 %
    on 5 classes, then "hardened" to 74 %; with its own mean/std it went from 67 % to 81 %)."""

    def check(accuracy: float | None, n: int) -> None:
        from mishield.audit.stats import chance_level, wilson_interval

        if accuracy is None or n == 0:
            return
        chance = chance_level(num_classes)
        high = wilson_interval(round(accuracy * n), n)[1]
        # The interval's upper end, not the estimate: a few validation images never trigger it.
        if high > chance + NEAR_CHANCE_SHARE * (1.0 - chance):
            return
        pre = loaded.preprocessing
        raise BadInputError(
            f"{loaded.source or loaded.arch} scores {100 * accuracy:.1f} % on the {n} validation images before any change "
            f"(95 % interval up to {100 * high:.1f} %), at chance ({100 * chance:.1f} % for {num_classes} classes): its "
            f"mean/std ({_numbers(pre.mean)} / {_numbers(pre.std)}), input size ({pre.input_size[1]} px) or class order "
            "(the data's class folders, sorted by name) is likely wrong; pass `mean`, `std` or `input_size`, or `force` "
            "to fine-tune it anyway."
        )

    return check


def _numbers(values) -> str:
    return ",".join(f"{v:g}" for v in values)


def _write_trained(loaded, out: Path, result, num_classes: int, overwrite: bool, record: dict, metrics: dict) -> None:
    from mishield.models import save_model

    save_model(
        out, result.model, arch=loaded.arch, num_classes=num_classes,
        surgery=_previous_surgery(loaded) + [result.surgery.spec], preprocessing=loaded.preprocessing,
        source=loaded.source, overwrite=overwrite, extra={"training": record, "metrics": metrics},
    )
