"""The training loop: data loaders, one optimisation step, epochs of a stage, `fit`, evaluation.

* Nothing is lost: after every epoch the full training state (weights, optimizer, scheduler,
  which stage, history) is written atomically (`mishield.training.state`); a run resumes from it
  exactly. Each epoch's randomness is derived from (seed, epoch, rank) alone
  (`mishield.runtime.seed_epoch`), so a resumed run replays what the uninterrupted run would have
  done (on CPU, bit for bit) without carrying RNG state across processes or ranks. A non-finite
  loss stops the run with the last good state kept; Ctrl-C and SIGTERM stop it the same way.
* Speed on CUDA: bf16 autocast, channels_last, optional torch.compile, pinned memory and loader
  workers; losses stay on the device and are read only every `sync_every` steps.
* Many GPUs: under `torchrun` the run is DDP with a DistributedSampler; rank 0 alone writes.
* Reporting goes through two plain callbacks (`mishield.progress`): `progress` per step and
  `on_epoch` once per epoch; None is silent.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from mishield.data import (
    DataSplits,
    ImageDataset,
    Item,
    eval_transform,
    train_transform,
)
from mishield.errors import BadInputError, MishieldError, UsageError
from mishield.preprocessing import Preprocessing
from mishield.progress import EpochCallback, ProgressCallback
from mishield.runtime import (
    Runtime,
    autocast,
    default_workers,
    make_runtime,
    resolve_device,
    seed_epoch,
)
from mishield.training.bido import (
    BiDOConfig,
    FeatureTap,
    bido_terms,
    find_feature_modules,
)
from mishield.training.freezing import FreezePlan, FrozenStages, plan_freeze
from mishield.training.interrupt import TrainingDiverged, interrupted, preemptible
from mishield.training.log import JsonlLog
from mishield.training.recipe import TrainingRecipe
from mishield.training.smoothing import LabelSmoothing, smoothed_cross_entropy
from mishield.training.state import (
    data_signature,
    model_signature,
    new_state,
    rescale_lr,
    resume_state,
    save_state,
)

# ---------------------------------------------------------------------------------------------
# Data loading


def _loader(
    items: Sequence[Item],
    transform: Callable,
    channels: int,
    *,
    batch_size: int,
    runtime: Runtime,
    workers: int,
    train: bool,
    seed: int = 0,
    epoch: int = 0,
) -> torch.utils.data.DataLoader:
    dataset = ImageDataset(items, transform, channels=channels)
    # A last batch of one sample breaks batch norm in train mode (and HSIC); drop partial
    # batches when there is more than one full batch's worth of data.
    drop_last = train and len(dataset) > batch_size
    sampler = None
    generator = None
    if runtime.distributed:
        sampler = torch.utils.data.distributed.DistributedSampler(
            dataset, num_replicas=runtime.world, rank=runtime.rank, shuffle=train, seed=seed, drop_last=drop_last
        )
        sampler.set_epoch(epoch)
    elif train:
        generator = torch.Generator().manual_seed(seed * 7919 + epoch)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        generator=generator,
        num_workers=workers,
        pin_memory=runtime.device.type == "cuda",
        drop_last=drop_last,
        # Workers are started per epoch on purpose: their augmentation RNG is then seeded from
        # the epoch's seed, which is what makes a resumed run replay the uninterrupted one.
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )


def clean_worker_error(err: Exception) -> MishieldError | None:
    """A BadInputError raised in a DataLoader worker comes back wrapped in a traceback text."""
    if isinstance(err, MishieldError):
        text = str(err).strip().splitlines()
        last = text[-1] if text else ""
        prefix = f"{type(err).__module__}.{type(err).__name__}: "
        last = last.removeprefix(prefix)
        return type(err)(last or str(err))
    return None


# ---------------------------------------------------------------------------------------------
# The training step


# A training objective other than cross-entropy on the folder labels: (logits, inputs, labels) ->
# (loss, the labels "correct" counts against). Distillation (mishield.training.distillation) uses it
# to train on a teacher's soft outputs and count agreement with the teacher's argmax.
Criterion = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


class TrainStep:
    """One optimisation step: forward (bf16 autocast on CUDA), CE (+ BiDO), backward, Adam.

    Returns device tensors (no host sync): summed loss, CE, HSIC(X, Z) and HSIC(Y, Z) terms and the
    number of correct predictions, so a caller reads them only when it wants to. With a
    `criterion` its loss takes CE's place (reported as "ce") and "correct" counts its labels.
    With `label_smoothing` the CE is against the smoothed targets at the factor of epoch
    `self.epoch` (set by the caller before each epoch; reported as "ce" too); while that factor
    is 0 the step is plain CE, bit for bit.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        runtime: Runtime,
        *,
        num_classes: int,
        bido: BiDOConfig | None = None,
        tap: FeatureTap | None = None,
        criterion: Criterion | None = None,
        label_smoothing: LabelSmoothing | None = None,
    ):
        if criterion is not None and label_smoothing is not None:
            raise UsageError("`label_smoothing` replaces cross-entropy, so it cannot be combined with a `criterion`.")
        self.model = model
        self.criterion = criterion
        self.label_smoothing = label_smoothing
        self.epoch = 0  # global, 0-based: selects the label-smoothing factor
        self.optimizer = optimizer
        self.runtime = runtime
        self.num_classes = num_classes
        self.bido = bido
        self.tap = tap
        if bido is not None and tap is None:
            raise ValueError("BiDO needs a FeatureTap on the model's stem and stage modules")

    def __call__(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        rt = self.runtime
        x = x.to(rt.device, non_blocking=True)
        y = y.to(rt.device, non_blocking=True)
        if rt.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(rt):
            logits = self.model(x)
        alpha = self.smoothing_factor()
        if self.criterion is not None:
            ce, y = self.criterion(logits.float(), x, y)
        elif alpha:
            ce = smoothed_cross_entropy(logits.float(), y, alpha)
        else:
            ce = F.cross_entropy(logits.float(), y)
        loss = ce
        zero = ce.new_zeros(())
        hx_sum = hy_sum = zero
        if self.bido is not None:
            feats = self.tap.features()
            hx, hy = bido_terms(
                feats, x, y, self.num_classes, sigma=self.bido.sigma, estimator=self.bido.estimator
            )
            hx_sum, hy_sum = sum(hx, zero), sum(hy, zero)
            loss = ce + self.bido.lx * hx_sum - self.bido.ly * hy_sum
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        correct = (logits.detach().argmax(dim=1) == y).sum()
        return {
            "loss": loss.detach(),
            "ce": ce.detach(),
            "hsic_x": hx_sum.detach(),
            "hsic_y": hy_sum.detach(),
            "correct": correct,
        }

    def smoothing_factor(self) -> float:
        """The label-smoothing factor of the current epoch (0 without label smoothing)."""
        return self.label_smoothing.factor(self.epoch) if self.label_smoothing is not None else 0.0


def _unused_parameters(model: nn.Module, example: Tensor) -> list[str]:
    """Parameters that get no gradient from a forward/backward pass (DDP must be told)."""
    was = model.training
    model.eval()  # keep batch-norm statistics untouched
    try:
        model.zero_grad(set_to_none=True)
        model(example).float().sum().backward()
        unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was)
    return unused


def _sync_buffers(model: nn.Module, rt: Runtime) -> None:
    """Give every rank rank 0's batch-norm statistics. DDP broadcasts buffers only at the start of
    each forward, so after the last step each rank holds its own; evaluation and the saved model
    must not depend on which rank computed them."""
    if rt.distributed:
        for buf in model.buffers():
            dist.broadcast(buf.data, src=0)


def _make_optimizer(model: nn.Module, recipe: TrainingRecipe, lr: float, start: int):
    """Adam + MultiStepLR for the epochs [start, total): milestones are global epochs, so stage 2
    of TTS continues the decay schedule of the whole run rather than restarting it."""
    milestones = recipe.milestone_epochs()
    initial = lr * recipe.gamma ** sum(1 for m in milestones if m <= start)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=initial, betas=tuple(recipe.betas))
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=[m - start for m in milestones if m > start], gamma=recipe.gamma
    )
    return optimizer, scheduler


# ---------------------------------------------------------------------------------------------
# One stage of training


@dataclass
class EpochRecord:
    stage: str
    epoch: int  # global, 1-based: epochs completed after this one
    train_loss: float
    train_ce: float
    train_acc: float
    hsic_x: float | None
    hsic_y: float | None
    val_acc: float | None
    lr: float
    images_per_s: float
    seconds: float
    label_smoothing: float | None = None  # the epoch's smoothing factor (None: no label smoothing)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class _StageContext:
    runtime: Runtime
    recipe: TrainingRecipe
    data: DataSplits
    preprocessing: Preprocessing
    num_classes: int
    workers: int
    compile: bool = False
    progress: ProgressCallback | None = None
    log: JsonlLog = field(default_factory=lambda: JsonlLog(None))
    sync_every: int = 50
    feature_names: Sequence[str] | None = None
    state_path: Path | None = None
    bido_points: list[str] = field(default_factory=list)
    on_epoch: EpochCallback | None = None
    criterion: Criterion | None = None
    # what `freeze_stages` freezes, decided on the model before surgery (None: decided per stage)
    freeze_plan: FreezePlan | None = None


@dataclass
class _Stage:
    """What a stage trains with, once set up: the optimiser, its schedule and the step."""

    optimizer: torch.optim.Optimizer
    scheduler: object
    step: TrainStep
    net: nn.Module
    start: int
    tap: FeatureTap | None
    frozen: FrozenStages | None = None


def _freeze(ctx: _StageContext, model: nn.Module, stage: str, example: Tensor) -> FrozenStages | None:
    """Apply `freeze_stages` before the optimiser is built, so it holds only the trainable parameters."""
    n = ctx.recipe.freeze_stages
    if not n:
        return None
    plan = ctx.freeze_plan or plan_freeze(model, example, n, declared=ctx.feature_names)
    frozen = plan.apply(model)
    ctx.log.write("freeze", stage=stage, **plan.to_dict())
    return frozen


def _setup_stage(ctx: _StageContext, model: nn.Module, stage: str, first: int, resume: dict | None) -> _Stage:
    """Device placement, BiDO's feature tap, optimiser (restored from `resume`), DDP and compile."""
    rt, recipe = ctx.runtime, ctx.recipe
    model.to(rt.device)
    if rt.channels_last:
        model.to(memory_format=torch.channels_last)
    example = torch.zeros((2, *ctx.preprocessing.input_size), device=rt.device)
    tap = None
    if recipe.bido is not None:
        points = find_feature_modules(model, example, declared=ctx.feature_names)
        if not points:
            raise BadInputError(
                f"found no stem or stage modules in {type(model).__name__} to apply BiDO to; train without --bido."
            )
        tap = FeatureTap(model, points)
        ctx.bido_points[:] = [str(p) for p in points]
        ctx.log.write("bido_features", stage=stage, points=ctx.bido_points)
    frozen = _freeze(ctx, model, stage, example)
    optimizer, scheduler = _make_optimizer(model, recipe, recipe.lr, first)
    start = first
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        start = int(resume["epoch"])
    net: nn.Module = model
    if rt.distributed:
        unused = _unused_parameters(model, example)
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
            find_unused_parameters=bool(unused),
        )
    if ctx.compile:
        net = torch.compile(net)
    step = TrainStep(net, optimizer, rt, num_classes=ctx.num_classes, bido=recipe.bido, tap=tap, criterion=ctx.criterion,
                     label_smoothing=recipe.label_smoothing)
    return _Stage(optimizer, scheduler, step, net, start, tap, frozen)


def _train_stage(
    ctx: _StageContext,
    model: nn.Module,
    stage: str,
    first: int,
    end: int,
    *,
    resume: dict | None,
    checkpoint: Callable[[nn.Module, dict, dict, list[dict]], None] | None,
    history: list[dict],
    stop_after: int | None = None,
) -> nn.Module:
    """Train `model` for global epochs [first, end) (continuing from `resume` when given)."""
    rt, recipe = ctx.runtime, ctx.recipe
    s = _setup_stage(ctx, model, stage, first, resume)
    train_tf = train_transform(ctx.preprocessing, erase=recipe.erase, augmentation=recipe.augmentation, noise=recipe.noise)
    epoch = s.start
    steps_done = 0
    try:
        with preemptible():
            for epoch in range(s.start, end):
                seed_epoch(recipe.seed, epoch, rt.rank)
                s.step.epoch = epoch
                loader = _loader(
                    ctx.data.train, train_tf, ctx.preprocessing.input_size[0], batch_size=recipe.batch_size,
                    runtime=rt, workers=ctx.workers, train=True, seed=recipe.seed, epoch=epoch,
                )
                total = (end - s.start) * len(loader)
                record = _run_epoch(ctx, s.net, s.step, loader, stage, epoch, end, s.optimizer, steps_done, total)
                steps_done += len(loader)
                s.scheduler.step()
                _sync_buffers(model, rt)
                if ctx.data.val:
                    record.val_acc = evaluate_accuracy(
                        model, ctx.data.val, ctx.preprocessing, device=rt.device,
                        batch_size=max(recipe.batch_size, 64), workers=ctx.workers, runtime=rt,
                    )
                _epoch_done(ctx, record, history, end)
                if checkpoint is not None:
                    checkpoint(model, s.optimizer.state_dict(), s.scheduler.state_dict(), history)
                if stop_after is not None and epoch + 1 >= stop_after:
                    raise KeyboardInterrupt  # tests: an interruption right after an epoch's checkpoint
    except KeyboardInterrupt as err:
        raise interrupted(err, f"{stage} epoch {epoch + 1}", ctx.state_path) from None
    except Exception as err:
        cleaned = clean_worker_error(err)
        if cleaned is not None and cleaned is not err:
            raise cleaned from None
        raise
    finally:
        if s.tap is not None:
            s.tap.remove()
        if s.frozen is not None:
            s.frozen.release()
    return model


def _epoch_done(ctx: _StageContext, record: EpochRecord, history: list[dict], end: int) -> None:
    history.append(record.to_dict())
    ctx.log.write("epoch", **record.to_dict())
    if ctx.on_epoch is not None and ctx.runtime.is_main:
        ctx.on_epoch({**record.to_dict(), "epochs": end})


def _run_epoch(ctx, net, step: TrainStep, loader, stage: str, epoch: int, end: int, optimizer,
               done_before: int = 0, total_steps: int | None = None) -> EpochRecord:
    """One pass over `loader`; progress reports `done_before + steps` of `total_steps` under `stage`."""
    rt = ctx.runtime
    net.train()
    dev = rt.device
    sums = {k: torch.zeros((), device=dev) for k in ("loss", "ce", "hsic_x", "hsic_y", "correct")}
    seen = 0
    steps = len(loader)
    report = ctx.progress if rt.is_main else None
    total_steps = total_steps or steps
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(loader):
        out = step(x, y)
        for k in sums:
            sums[k] += out[k] * (1 if k == "correct" else x.shape[0])
        seen += x.shape[0]
        if (i + 1) % ctx.sync_every == 0 or i + 1 == steps:
            # The only host sync of the loop: check the running loss.
            running = sums["loss"].item() / seen
            if not math.isfinite(running):
                raise TrainingDiverged(
                    f"the training loss became {running} in {stage} epoch {epoch + 1} (by step {i + 1}); "
                    "the last good state is kept — lower --lr and rerun (--resume continues from it)."
                )
        if report is not None:
            report(stage, done_before + i + 1, total_steps)
    if seen == 0:
        raise BadInputError("the training set has no images to train on; check --data.")
    totals = torch.stack([sums[k] for k in ("loss", "ce", "hsic_x", "hsic_y", "correct")]).double()
    count = torch.tensor(float(seen), dtype=torch.float64, device=dev)
    if rt.distributed:
        dist.all_reduce(totals)
        dist.all_reduce(count)
    totals = (totals / count).tolist()
    if not math.isfinite(totals[0]):
        raise TrainingDiverged(
            f"the training loss became {totals[0]} in {stage} epoch {epoch + 1}; the last good state is kept — "
            "lower --lr and rerun (--resume continues from it)."
        )
    seconds = time.perf_counter() - t0
    bido = step.bido is not None
    return EpochRecord(
        stage=stage,
        epoch=epoch + 1,
        train_loss=totals[0],
        train_ce=totals[1],
        train_acc=totals[4],
        hsic_x=totals[2] if bido else None,
        hsic_y=totals[3] if bido else None,
        val_acc=None,
        lr=optimizer.param_groups[0]["lr"],
        images_per_s=float(count.item()) / max(seconds, 1e-9),
        seconds=seconds,
        label_smoothing=step.smoothing_factor() if step.label_smoothing is not None else None,
    )


# ---------------------------------------------------------------------------------------------
# Evaluation and the single-stage trainer


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module,
    items: Sequence[Item],
    preprocessing: Preprocessing,
    *,
    device: str | torch.device = "auto",
    batch_size: int = 256,
    workers: int | None = None,
    runtime: Runtime | None = None,
) -> float:
    """Top-1 accuracy of `model` on `items` with the eval transform (the model's mode is restored).

    Inside a torchrun job every rank scores its own shard and the counts are summed.
    """
    if not items:
        raise BadInputError("there are no validation images to measure accuracy on; pass `val_data` or `val_fraction`.")
    rt = runtime or Runtime(resolve_device(device))
    if runtime is None and rt.device.type == "cuda":
        rt.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        rt.channels_last = True
    if runtime is None and dist.is_initialized():
        rt.rank, rt.world = dist.get_rank(), dist.get_world_size()
    shard = list(items)[rt.rank :: rt.world] if rt.distributed else list(items)
    workers = default_workers(rt) if workers is None else workers
    was_training = model.training
    model.eval()
    model.to(rt.device)
    correct = torch.zeros((), dtype=torch.float64, device=rt.device)
    loader = torch.utils.data.DataLoader(
        ImageDataset(shard, eval_transform(preprocessing), channels=preprocessing.input_size[0]),
        batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=rt.device.type == "cuda",
    )
    try:
        for x, y in loader:
            x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
            if rt.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(rt):
                logits = model(x)
            correct += (logits.argmax(dim=1) == y).sum()
    except Exception as err:
        cleaned = clean_worker_error(err)
        if cleaned is not None:
            raise cleaned from None
        raise
    finally:
        model.train(was_training)
    total = torch.tensor(float(len(shard)), dtype=torch.float64, device=rt.device)
    if rt.distributed:
        dist.all_reduce(correct)
        dist.all_reduce(total)
    return float(correct.item() / max(total.item(), 1.0))


@dataclass
class FitResult:
    model: nn.Module  # trained, on the CPU, in eval mode
    history: list[dict]
    seconds: float
    resumed_from_epoch: int | None = None

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}


def to_cpu_eval(model: nn.Module) -> nn.Module:
    model.to("cpu", memory_format=torch.contiguous_format)
    return model.eval()


@dataclass(frozen=True)
class RunOptions:
    """How a training run runs, beside what it trains (the `TrainingRecipe`): the device, loader
    workers, torch.compile, the resumable state (`resume` continues it) and the JSON-lines log
    beside the output, `stop_after` (global epochs), which simulates an interruption in tests, and
    `check_before(accuracy, images)`, called by `run_schedule` with the natural accuracy it measures
    before anything changes (on every rank), which may raise to stop the run before any training
    (`harden` refuses an original that scores at chance)."""

    device: str | torch.device = "auto"
    workers: int | None = None
    compile: bool = False
    state_path: Path | None = None
    resume: bool = False
    log_path: Path | None = None
    stop_after: int | None = None
    check_before: Callable[[float | None, int], None] | None = None


# fit()'s keyword arguments before TrainingRecipe and RunOptions, and which one each belongs to.
_RECIPE_KEYWORDS = ("epochs", "lr", "batch_size", "seed", "bido", "label_smoothing", "erase", "freeze_stages", "augmentation",
                    "noise")
_OPTION_KEYWORDS = tuple(f.name for f in dataclasses.fields(RunOptions))


def split_keywords(call: str, keywords: dict, recipe_keywords: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """The former keyword form of `fit` / `run_schedule`: (recipe fields, RunOptions fields), with a DeprecationWarning."""
    if not keywords:
        return {}, {}
    unknown = sorted(set(keywords) - set(recipe_keywords) - set(_OPTION_KEYWORDS))
    if unknown:
        raise UsageError(f"`{call}` got unexpected keyword argument(s) {', '.join(unknown)}; pass `recipe` and `options` (RunOptions).")
    import warnings

    warnings.warn(f"{call}(..., {', '.join(sorted(keywords))}) is deprecated; pass recipe=TrainingRecipe(...) and "
                  "options=RunOptions(...) instead.", DeprecationWarning, stacklevel=3)
    return ({k: v for k, v in keywords.items() if k in recipe_keywords},
            {k: v for k, v in keywords.items() if k in _OPTION_KEYWORDS})


def fit(
    model: nn.Module,
    data: DataSplits,
    preprocessing: Preprocessing,
    recipe: TrainingRecipe | None = None,
    *,
    options: RunOptions | None = None,
    num_classes: int | None = None,
    progress: ProgressCallback | None = None,
    on_epoch: EpochCallback | None = None,
    criterion: Criterion | None = None,
    **keywords,
) -> FitResult:
    """Train `model` (in place) on `data.train` for `recipe.epochs` with the recipe's optimizer and LR schedule.

    The reusable single-stage trainer (evaluation models, surrogates and priors' kin are trained
    with it); `recipe` is a `TrainingRecipe` (its schedule is ignored: one stage). With
    `options.state_path` the state is saved after every epoch and `options.resume` continues from
    it. `criterion` replaces cross-entropy (see `Criterion`); its `fingerprint` attribute, if any,
    adds what else defines the run (a distillation's teacher and temperature) to what a resumed run
    must share. The former keyword form (`epochs=`, `lr=`, `device=`, ...) is deprecated.
    """
    recipe_given, options_given = split_keywords("fit", keywords, _RECIPE_KEYWORDS)
    if recipe is None:
        if "epochs" not in recipe_given:
            raise UsageError("`fit` needs `recipe` (a TrainingRecipe: epochs, lr, batch_size, seed, bido).")
        recipe = TrainingRecipe(schedule="finetune", **recipe_given)
    options = options or RunOptions(**options_given)
    recipe = dataclasses.replace(recipe, schedule="finetune")
    rt = make_runtime(options.device)
    num_classes = num_classes or data.num_classes
    log = JsonlLog(options.log_path, enabled=rt.is_main)
    ctx = _StageContext(
        rt, recipe, data, preprocessing, num_classes, default_workers(rt) if options.workers is None else options.workers,
        options.compile, progress, log, state_path=options.state_path, on_epoch=on_epoch, criterion=criterion,
    )
    fingerprint = run_fingerprint(recipe, data, preprocessing, model, None) | dict(getattr(criterion, "fingerprint", None) or {})
    state = resume_classifier_state(options.state_path, options.resume, fingerprint, recipe)
    history: list[dict] = list(state["history"]) if state else []
    t0 = time.perf_counter()
    try:
        _train_stage(ctx, model, "train", 0, recipe.epochs, resume=state,
                     checkpoint=checkpointer(rt, options.state_path, "train", recipe, fingerprint, {}),
                     history=history, stop_after=options.stop_after)
    finally:
        rt.close()
    return FitResult(to_cpu_eval(model), history, time.perf_counter() - t0,
                     int(state["epoch"]) if state else None)


# ---------------------------------------------------------------------------------------------
# The classifier trainers' resumable state


def resume_classifier_state(state_path: Path | None, resume: bool, fingerprint: dict,
                            recipe: TrainingRecipe) -> dict | None:
    """The saved state to continue from (checked against this run), or None for a fresh start."""
    state = resume_state(state_path, resume, fingerprint, "classifier",
                         required=("stage", "model", "optimizer", "scheduler", "history", "recipe"))
    if state is not None and float(state["recipe"]["lr"]) != recipe.lr:
        rescale_lr(state, recipe.lr / float(state["recipe"]["lr"]))
    return state


def checkpointer(rt: Runtime, state_path: Path | None, stage: str, recipe: TrainingRecipe, fingerprint: dict,
                 metrics: dict) -> Callable:
    """The after-every-epoch save of a stage's resumable state (rank 0 writes, every rank waits)."""
    def save(m, opt, sched, hist):
        if state_path is not None and rt.is_main:
            epoch = hist[-1]["epoch"] if hist else 0
            save_state(Path(state_path), new_state(
                "classifier", epoch, fingerprint, stage=stage,
                model={k: v.detach().cpu().contiguous() for k, v in m.state_dict().items()},
                optimizer=opt, scheduler=sched, history=hist, recipe=recipe.to_dict(), metrics=metrics,
                rng={"scheme": "per-epoch seeds from (seed, epoch, rank)", "seed": recipe.seed},
            ))
        rt.barrier()
    return save


def run_fingerprint(recipe: TrainingRecipe, data: DataSplits, preprocessing: Preprocessing, model: nn.Module,
                    plan_spec: dict | None) -> dict:
    """What a resumed run must share with the interrupted one: recipe (but lr), data, input, model, surgery."""
    d = recipe.to_dict()
    d.pop("lr")  # a resumed run may lower the learning rate (e.g. after a divergence)
    return {
        "recipe": d,
        "classes": list(data.classes),
        "train_images": len(data.train),
        "data": data_signature(data.train),
        "input_size": list(preprocessing.input_size),
        "normalisation": [list(preprocessing.mean), list(preprocessing.std)],
        "model": model_signature(model),
        "surgery": plan_spec,
    }
