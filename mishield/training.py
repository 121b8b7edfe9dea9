"""Fine-tuning: the paper's two-stage training (TTS), plain fine-tuning after surgery, and BiDO.

    result = run_schedule(model, plan, splits, preprocessing, TrainingRecipe(schedule="tts"),
                          state_path=Path("out.pt.train-state"), log_path=Path("out.pt.train.jsonl"))

* **TTS** (DESIGN.md §2): stage 1 trains the model as it is, with every skip connection, for M
  epochs; stage 2 applies the surgery (RoLSS / SSF) to the stage-1 weights and trains N more
  epochs. **finetune**: surgery first, then N epochs.
* Recipe: Adam(lr, betas (0.9, 0.999)), MultiStepLR at 75 % and 90 % of all epochs (gamma 0.1),
  batch 128. The paper's lr 1e-3 is for fine-tuning from ImageNet weights; for a checkpoint that is
  already trained on the private data we default to 1e-4 (`default_lr`), so the surgery's
  perturbation is repaired without washing out what the earlier stages learned.
* Nothing is lost: after every epoch the full training state (weights, optimizer, scheduler,
  which stage, history) is written atomically; a run resumes from it exactly. Each epoch's
  randomness is derived from (seed, epoch, rank) alone, so a resumed run replays what the
  uninterrupted run would have done (on CPU, bit for bit) without carrying RNG state across
  processes or ranks. A non-finite loss stops the run with the last good state kept.
* Speed on CUDA: bf16 autocast, channels_last, optional torch.compile, pinned memory and loader
  workers; losses stay on the device and are read only every `sync_every` steps.
* Many GPUs: under `torchrun` the run is DDP with a DistributedSampler; rank 0 alone writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from mishield.bido import (
    BiDOConfig,
    FeatureTap,
    bido_terms,
    declared_feature_modules,
    find_feature_modules,
)
from mishield.data import (
    DataSplits,
    ImageDataset,
    Item,
    eval_transform,
    train_transform,
)
from mishield.errors import BadInputError, MishieldError, UsageError
from mishield.fileio import atomic_output
from mishield.preprocessing import Preprocessing
from mishield.runtime import (
    Runtime,
    autocast,
    default_workers,
    make_runtime,
    resolve_device,
    seed_epoch,
)

SCHEDULES = ("tts", "finetune")
RECIPE_LR = 1e-3  # the paper's (fine-tuning from ImageNet weights, or training a new head)
TRAINED_CHECKPOINT_LR = 1e-4  # our default for a model already trained on the private data
STATE_FORMAT = "mishield-train-state"
STATE_VERSION = 1


class TrainingDiverged(MishieldError):
    """The loss became NaN or infinite; the last good state is kept."""

    exit_code = 1


class TrainingInterrupted(MishieldError):
    """Ctrl-C during training; the last completed epoch is saved and resumable."""

    exit_code = 130


def default_lr(model_is_trained: bool, reset_head: bool = False) -> float:
    """The recipe's 1e-3 for random or re-initialised heads, 1e-4 for an already-trained model."""
    return RECIPE_LR if (reset_head or not model_is_trained) else TRAINED_CHECKPOINT_LR


@dataclass
class TrainingRecipe:
    """Everything that defines a training run (the resolved config recorded in the model file)."""

    schedule: str = "tts"
    epochs: int = 10  # N: stage-2 epochs for TTS, all epochs for finetune
    stage1_epochs: int = 5  # M: TTS stage-1 epochs with full skips (the paper's 5)
    lr: float = RECIPE_LR
    betas: tuple[float, float] = (0.9, 0.999)
    milestones: tuple[float, ...] = (0.75, 0.9)  # fractions of all epochs
    gamma: float = 0.1
    batch_size: int = 128
    seed: int = 0
    bido: BiDOConfig | None = None

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise UsageError(f"--schedule must be one of {', '.join(SCHEDULES)}, not {self.schedule!r}.")
        if self.epochs < 0 or self.stage1_epochs < 0:
            raise UsageError("--epochs and --stage1-epochs must be 0 or more.")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UsageError(f"--lr must be a positive number, got {self.lr}.")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}.")

    @property
    def stages(self) -> list[tuple[str, int, int]]:
        """(stage name, first global epoch, end global epoch) in order."""
        if self.schedule == "tts":
            m = self.stage1_epochs
            return [("stage1", 0, m), ("stage2", m, m + self.epochs)]
        return [("finetune", 0, self.epochs)]

    @property
    def total_epochs(self) -> int:
        return self.stages[-1][2]

    def milestone_epochs(self) -> list[int]:
        total = self.total_epochs
        return sorted({max(1, round(f * total)) for f in self.milestones})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"], d["milestones"] = list(self.betas), list(self.milestones)
        d["bido"] = self.bido.to_dict() if self.bido else None
        return d


# ---------------------------------------------------------------------------------------------
# Logging and progress


class JsonlLog:
    """Append-only JSON-lines training log (rank 0 writes; flushed per record)."""

    def __init__(self, path: Path | None, enabled: bool = True):
        self.path = Path(path) if path else None
        self.enabled = enabled and self.path is not None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, event: str, **fields) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), "event": event, **fields}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=_json_default) + "\n")


def _json_default(obj):
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return str(obj)


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[object | None]:
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as bar:
        yield bar


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


def _clean_worker_error(err: Exception) -> MishieldError | None:
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


class TrainStep:
    """One optimisation step: forward (bf16 autocast on CUDA), CE (+ BiDO), backward, Adam.

    Returns device tensors (no host sync): summed loss, CE, HSIC(X, Z) and HSIC(Y, Z) terms and the
    number of correct predictions, so a caller reads them only when it wants to.
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
    ):
        self.model = model
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
# Training state on disk


def save_state(path: Path, state: dict) -> None:
    """Atomically replace the resumable training state (weights-only loadable)."""
    with atomic_output(path, overwrite=True) as tmp:
        torch.save(state, tmp)


def load_state(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a damaged zip
        raise BadInputError(
            f"{path} is not a readable training state ({type(err).__name__}); delete it and start over."
        ) from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise BadInputError(f"{path} is not a mishield training state; point --resume at the file a run left.")
    if state.get("version", 0) > STATE_VERSION:
        raise BadInputError(f"{path} was written by a newer mishield; upgrade mishield to resume it.")
    return state


def _check_fingerprint(path: Path, saved: dict, current: dict) -> None:
    for key, value in current.items():
        if key in saved and saved[key] != value:
            shown = lambda v: json.dumps(v)[:80]
            raise UsageError(
                f"{path} was made by a different run ({key} was {shown(saved[key])}, now {shown(value)}); "
                "rerun with the original settings to resume, or pass --overwrite to start over."
            )


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
    compile: bool
    progress: bool
    log: JsonlLog
    sync_every: int = 50
    feature_names: Sequence[str] | None = None
    state_path: Path | None = None
    bido_points: list[str] = field(default_factory=list)


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
    model.to(rt.device)
    if rt.channels_last:
        model.to(memory_format=torch.channels_last)
    channels = ctx.preprocessing.input_size[0]
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
    step = TrainStep(net, optimizer, rt, num_classes=ctx.num_classes, bido=recipe.bido, tap=tap)

    train_tf = train_transform(ctx.preprocessing)
    epoch = start
    task = None
    try:
        with _progress(ctx.progress and rt.is_main) as bar:
            for epoch in range(start, end):
                seed_epoch(recipe.seed, epoch, rt.rank)
                loader = _loader(
                    ctx.data.train, train_tf, channels, batch_size=recipe.batch_size, runtime=rt,
                    workers=ctx.workers, train=True, seed=recipe.seed, epoch=epoch,
                )
                if bar is not None and task is None:
                    task = bar.add_task(stage, total=(end - start) * len(loader), status="")
                record = _run_epoch(ctx, net, step, loader, stage, epoch, end, optimizer, bar, task)
                scheduler.step()
                _sync_buffers(model, rt)
                if ctx.data.val:
                    record.val_acc = evaluate_accuracy(
                        model, ctx.data.val, ctx.preprocessing, device=rt.device,
                        batch_size=max(recipe.batch_size, 64), workers=ctx.workers, runtime=rt,
                    )
                history.append(record.to_dict())
                ctx.log.write("epoch", **record.to_dict())
                if checkpoint is not None:
                    checkpoint(model, optimizer.state_dict(), scheduler.state_dict(), history)
                if stop_after is not None and epoch + 1 >= stop_after:
                    raise KeyboardInterrupt  # tests: an interruption right after an epoch's checkpoint
    except KeyboardInterrupt:
        if ctx.state_path is not None and Path(ctx.state_path).exists():
            advice = (f"the state after the last completed epoch is in {ctx.state_path} — rerun the same "
                      "command with --resume to continue")
        elif ctx.state_path is not None:
            advice = "no epoch had finished, so nothing was saved — rerun the same command to start again"
        else:
            advice = "no state file was asked for, so the run cannot be resumed"
        raise TrainingInterrupted(f"training interrupted in {stage} epoch {epoch + 1}; {advice}.") from None
    except Exception as err:
        cleaned = _clean_worker_error(err)
        if cleaned is not None and cleaned is not err:
            raise cleaned from None
        raise
    finally:
        if tap is not None:
            tap.remove()
    return model


def _run_epoch(ctx, net, step: TrainStep, loader, stage: str, epoch: int, end: int, optimizer, bar, task) -> EpochRecord:
    rt = ctx.runtime
    net.train()
    dev = rt.device
    sums = {k: torch.zeros((), device=dev) for k in ("loss", "ce", "hsic_x", "hsic_y", "correct")}
    seen = 0
    steps = len(loader)
    if bar is not None:
        bar.update(task, description=f"{stage} epoch {epoch + 1}/{end}")
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(loader):
        out = step(x, y)
        for k in sums:
            sums[k] += out[k] * (1 if k == "correct" else x.shape[0])
        seen += x.shape[0]
        if (i + 1) % ctx.sync_every == 0 or i + 1 == steps:
            # The only host sync of the loop: check the running loss and show it.
            running = sums["loss"].item() / seen
            running_ce = sums["ce"].item() / seen
            if not math.isfinite(running):
                raise TrainingDiverged(
                    f"the training loss became {running} in {stage} epoch {epoch + 1} (by step {i + 1}); "
                    "the last good state is kept — lower --lr and rerun (--resume continues from it)."
                )
            if bar is not None:
                status = f"loss {running:.4f}" + (f" (ce {running_ce:.4f})" if step.bido is not None else "")
                bar.update(task, advance=1, status=status)
        elif bar is not None:
            bar.update(task, advance=1)
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
    )


# ---------------------------------------------------------------------------------------------
# Public API: evaluation, fit, the TTS / finetune schedule


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
        raise BadInputError("there are no validation images to measure accuracy on; pass --val-data or --val-fraction.")
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
        cleaned = _clean_worker_error(err)
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


def _to_cpu_eval(model: nn.Module) -> nn.Module:
    model.to("cpu", memory_format=torch.contiguous_format)
    return model.eval()


def fit(
    model: nn.Module,
    data: DataSplits,
    preprocessing: Preprocessing,
    *,
    epochs: int,
    lr: float = RECIPE_LR,
    batch_size: int = 128,
    device: str | torch.device = "auto",
    seed: int = 0,
    bido: BiDOConfig | None = None,
    num_classes: int | None = None,
    workers: int | None = None,
    compile: bool = False,
    state_path: Path | None = None,
    resume: bool = False,
    log_path: Path | None = None,
    progress: bool = False,
    stop_after: int | None = None,
) -> FitResult:
    """Train `model` (in place) on `data.train` with the recipe's optimizer and LR schedule.

    The reusable single-stage trainer (the audit trains its evaluation models with it). With
    `state_path` the state is saved after every epoch and `resume=True` continues from it.
    """
    recipe = TrainingRecipe(schedule="finetune", epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, bido=bido)
    rt = make_runtime(device)
    num_classes = num_classes or data.num_classes
    log = JsonlLog(log_path, enabled=rt.is_main)
    ctx = _StageContext(
        rt, recipe, data, preprocessing, num_classes,
        default_workers(rt) if workers is None else workers, compile, progress, log, state_path=state_path,
    )
    fingerprint = _fingerprint(recipe, data, None)
    resume_state = _resume_state(state_path, resume, fingerprint, recipe)
    history: list[dict] = list(resume_state["history"]) if resume_state else []
    t0 = time.perf_counter()
    try:
        _train_stage(ctx, model, "train", 0, epochs, resume=resume_state,
                     checkpoint=_checkpointer(rt, state_path, "train", recipe, fingerprint, {}),
                     history=history, stop_after=stop_after)
    finally:
        rt.close()
    return FitResult(_to_cpu_eval(model), history, time.perf_counter() - t0,
                     int(resume_state["epoch"]) if resume_state else None)


def _resume_state(state_path: Path | None, resume: bool, fingerprint: dict, recipe: TrainingRecipe) -> dict | None:
    """The saved state to continue from (checked against this run), or None for a fresh start."""
    if not (resume and state_path is not None and Path(state_path).exists()):
        return None
    state = load_state(Path(state_path))
    _check_fingerprint(Path(state_path), state.get("fingerprint", {}), fingerprint)
    if float(state["recipe"]["lr"]) != recipe.lr:
        _rescale_lr(state, recipe.lr / float(state["recipe"]["lr"]))
    return state


def _checkpointer(rt: Runtime, state_path: Path | None, stage: str, recipe: TrainingRecipe, fingerprint: dict,
                  metrics: dict) -> Callable:
    """The after-every-epoch save of a stage's resumable state (rank 0 writes, every rank waits)."""
    def save(m, opt, sched, hist):
        if state_path is not None and rt.is_main:
            epoch = hist[-1]["epoch"] if hist else 0
            save_state(Path(state_path), _state_dict(stage, epoch, m, opt, sched, hist, recipe, fingerprint, metrics))
        rt.barrier()
    return save


def _fingerprint(recipe: TrainingRecipe, data: DataSplits, plan_spec: dict | None) -> dict:
    d = recipe.to_dict()
    d.pop("lr")  # a resumed run may lower the learning rate (e.g. after a divergence)
    return {
        "recipe": d,
        "classes": list(data.classes),
        "train_images": len(data.train),
        "surgery": plan_spec,
    }


def _state_dict(stage, epoch, model, opt, sched, history, recipe, fingerprint, metrics) -> dict:
    return {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "stage": stage,
        "epoch": int(epoch),
        "model": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "optimizer": opt,
        "scheduler": sched,
        "history": history,
        "recipe": recipe.to_dict(),
        "fingerprint": fingerprint,
        "metrics": metrics,
        "rng": {"scheme": "per-epoch seeds from (seed, epoch, rank)", "seed": recipe.seed},
    }


@dataclass
class ScheduleResult:
    model: nn.Module  # the hardened model, trained, on the CPU, in eval mode
    surgery: object  # mishield.surgery.SurgeryResult
    recipe: TrainingRecipe
    history: list[dict] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0
    resumed_from: dict | None = None  # {"stage": ..., "epoch": ...}
    bido_features: list[str] = field(default_factory=list)

    def training_record(self) -> dict:
        """What the hardened model file records under "training"."""
        return {
            **self.recipe.to_dict(),
            "epochs_run": self.recipe.total_epochs,
            "seconds": round(self.seconds, 2),
            "final": self.history[-1] if self.history else None,
        }


def _apply_surgery(model: nn.Module, plan):
    from mishield.surgery import apply_plan

    model.to("cpu", memory_format=torch.contiguous_format)
    return apply_plan(model, plan)


def run_schedule(
    model: nn.Module,
    plan,
    data: DataSplits,
    preprocessing: Preprocessing,
    recipe: TrainingRecipe,
    *,
    device: str | torch.device = "auto",
    workers: int | None = None,
    compile: bool = False,
    state_path: Path | None = None,
    resume: bool = False,
    log_path: Path | None = None,
    progress: bool = False,
    num_classes: int | None = None,
    stop_after: int | None = None,
) -> ScheduleResult:
    """Harden `model` with `plan` (mishield.surgery.plan_surgery) under the TTS or finetune schedule.

    `model` is the trained classifier as loaded (it is trained in place in TTS stage 1; surgery
    works on a copy). Natural accuracy on `data.val` is measured before anything changes, right
    after surgery, and at the end. `stop_after` (global epochs) simulates an interruption (tests).
    """
    rt = make_runtime(device)
    try:
        return _run_schedule(
            rt, model, plan, data, preprocessing, recipe, workers=workers, compile=compile,
            state_path=state_path, resume=resume, log_path=log_path, progress=progress,
            num_classes=num_classes, stop_after=stop_after,
        )
    finally:
        rt.close()


def _run_schedule(rt, model, plan, data, preprocessing, recipe, *, workers, compile, state_path, resume,
                  log_path, progress, num_classes, stop_after) -> ScheduleResult:
    t0 = time.perf_counter()
    num_classes = num_classes or data.num_classes
    log = JsonlLog(log_path, enabled=rt.is_main)
    ctx = _StageContext(
        rt, recipe, data, preprocessing, num_classes,
        default_workers(rt) if workers is None else workers, compile, progress, log,
        feature_names=declared_feature_modules(model), state_path=state_path,
    )
    plan_record = {"method": plan.method, "alpha": plan.alpha, "sites": list(plan.selected)}
    fingerprint = _fingerprint(recipe, data, plan_record)

    state = _resume_state(state_path, resume, fingerprint, recipe)
    history: list[dict] = list(state["history"]) if state else []
    metrics: dict = dict(state.get("metrics", {})) if state else {}

    def evaluate(m: nn.Module) -> float | None:
        if not data.val:
            return None
        return evaluate_accuracy(m, data.val, preprocessing, device=rt.device,
                                 batch_size=max(recipe.batch_size, 64), workers=ctx.workers, runtime=rt)

    if state is None:
        log.write("start", recipe=recipe.to_dict(), surgery=plan_record, classes=data.classes,
                  train_images=len(data.train), val_images=len(data.val), device=str(rt.device), world=rt.world)
        metrics["natural_acc_before"] = evaluate(model)
    else:
        log.write("resume", stage=state["stage"], epoch=state["epoch"])

    stages = recipe.stages
    resume_index = [s[0] for s in stages].index(state["stage"]) if state else -1
    surgery = None
    current = model
    for index, (name, first, end) in enumerate(stages):
        if name in ("stage2", "finetune"):
            surgery = _apply_surgery(current, plan)
            current = surgery.model
            if index > resume_index:  # the surgery acts on real weights (not a structure to load into)
                log.write("surgery", stage=name, **surgery.spec)
                metrics["natural_acc_after_surgery"] = evaluate(current)
        if index < resume_index:
            continue  # finished before the interruption; its weights are part of the saved state
        stage_state = state if index == resume_index else None
        if stage_state is not None and int(stage_state["epoch"]) >= end:
            current.load_state_dict(stage_state["model"])
            continue
        if end > first:
            _train_stage(ctx, current, name, first, end, resume=stage_state,
                         checkpoint=_checkpointer(rt, state_path, name, recipe, fingerprint, metrics),
                         history=history, stop_after=stop_after)

    metrics["natural_acc_after"] = evaluate(current)
    rt.barrier()
    seconds = time.perf_counter() - t0
    log.write("end", metrics=metrics, seconds=round(seconds, 2))
    return ScheduleResult(
        model=_to_cpu_eval(current), surgery=surgery, recipe=recipe, history=history, metrics=metrics,
        seconds=seconds, resumed_from={"stage": state["stage"], "epoch": int(state["epoch"])} if state else None,
        bido_features=list(ctx.bido_points),
    )


def _rescale_lr(state: dict, ratio: float) -> None:
    for group in state["optimizer"].get("param_groups", []):
        group["lr"] *= ratio
        if "initial_lr" in group:
            group["initial_lr"] *= ratio
    sched = state["scheduler"]
    sched["base_lrs"] = [b * ratio for b in sched.get("base_lrs", [])]
    sched["_last_lr"] = [b * ratio for b in sched.get("_last_lr", [])]


def reset_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Replace the classifier with a freshly initialised one for `num_classes` (`--reset-head`)."""
    reset = getattr(model, "reset_classifier", None)
    if callable(reset):  # timm
        reset(num_classes)
        return model
    from mishield.models import find_classifier

    found = find_classifier(model)
    old = found[1] if found else None
    if isinstance(old, nn.Linear):
        new: nn.Module = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    elif isinstance(old, nn.Conv2d):  # squeezenet-style 1x1 conv heads
        new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride, old.padding,
                        bias=old.bias is not None)
    else:
        raise BadInputError(
            f"cannot find the classifier layer of {type(model).__name__} to reset; "
            "prepare a model with the right number of classes yourself."
        )
    parent_name, _, leaf = found[0].rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)
    return model
