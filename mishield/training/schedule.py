"""The paper's two-stage schedule (TTS), plain fine-tuning after surgery, and `--reset-head`.

    result = run_schedule(model, plan, splits, preprocessing, TrainingRecipe(schedule="tts"),
                          options=RunOptions(state_path=Path("out.pt.train-state"), log_path=Path("out.pt.train.jsonl")))

* **TTS** (docs/architecture.md; Koh et al., "On the Vulnerability of Skip Connections to Model
  Inversion Attacks", ECCV 2024): stage 1 trains the model as it is, with every skip connection,
  for M epochs; stage 2 applies the surgery (RoLSS / SSF) to the stage-1 weights and trains N
  more epochs. **finetune**: surgery first, then N epochs.
* One resumable state covers the whole schedule (which stage, which epoch); see
  `mishield.training.state`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from mishield.data import DataSplits
from mishield.errors import BadInputError
from mishield.preprocessing import Preprocessing
from mishield.progress import EpochCallback, ProgressCallback
from mishield.runtime import default_workers, make_runtime
from mishield.training.bido import declared_feature_modules
from mishield.training.freezing import plan_freeze
from mishield.training.log import JsonlLog
from mishield.training.loop import (
    RunOptions,
    _StageContext,
    _train_stage,
    checkpointer,
    evaluate_accuracy,
    resume_classifier_state,
    run_fingerprint,
    split_keywords,
    to_cpu_eval,
)
from mishield.training.recipe import TrainingRecipe


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
    options: RunOptions | None = None,
    num_classes: int | None = None,
    progress: ProgressCallback | None = None,
    on_epoch: EpochCallback | None = None,
    **keywords,
) -> ScheduleResult:
    """Harden `model` with `plan` (mishield.surgery.plan_surgery) under the TTS or finetune schedule.

    `model` is the trained classifier as loaded (it is trained in place in TTS stage 1; surgery
    works on a copy). Natural accuracy on `data.val` is measured before anything changes, right
    after surgery, and at the end. `progress(stage, step, steps)` is called every step and
    `on_epoch(record)` after every epoch (rank 0; see `mishield.progress`). Ctrl-C or SIGTERM
    stops the run with a resumable state (TrainingInterrupted, TrainingPreempted). `options`
    (`RunOptions`) give the device, workers, compile, the state and log files and `resume`; the
    former keyword form (`device=`, `state_path=`, ...) is deprecated.
    """
    options = options or RunOptions(**split_keywords("run_schedule", keywords)[1])
    rt = make_runtime(options.device)
    t0 = time.perf_counter()
    ctx = _StageContext(
        rt, recipe, data, preprocessing, num_classes or data.num_classes,
        default_workers(rt) if options.workers is None else options.workers, options.compile, progress,
        JsonlLog(options.log_path, enabled=rt.is_main), feature_names=declared_feature_modules(model),
        state_path=options.state_path, on_epoch=on_epoch,
    )
    if recipe.freeze_stages:
        # Decided once, on the model before surgery, and applied by name to every stage's model:
        # a rewritten model no longer runs its stage modules as modules, and the same layers must
        # stay frozen in TTS stage 1 and stage 2 (both train on the private data).
        example = torch.zeros((2, *preprocessing.input_size), device=next(model.parameters()).device)
        ctx.freeze_plan = plan_freeze(model, example, recipe.freeze_stages, declared=ctx.feature_names)
    try:
        result = _run_stages(ctx, model, plan, options)
    finally:
        rt.close()
    result.seconds = time.perf_counter() - t0
    ctx.log.write("end", metrics=result.metrics, seconds=round(result.seconds, 2))
    return result


def _run_stages(ctx: _StageContext, model: nn.Module, plan, options: RunOptions) -> ScheduleResult:
    rt, recipe, data, log = ctx.runtime, ctx.recipe, ctx.data, ctx.log
    plan_record = {"method": plan.method, "alpha": plan.alpha, "sites": list(plan.selected)}
    fingerprint = run_fingerprint(recipe, data, ctx.preprocessing, model, plan_record)
    state = resume_classifier_state(ctx.state_path, options.resume, fingerprint, recipe)
    history: list[dict] = list(state["history"]) if state else []
    metrics: dict = dict(state.get("metrics", {})) if state else {}

    def evaluate(m: nn.Module) -> float | None:
        if not data.val:
            return None
        return evaluate_accuracy(m, data.val, ctx.preprocessing, device=rt.device,
                                 batch_size=max(recipe.batch_size, 64), workers=ctx.workers, runtime=rt)

    if state is None:
        log.write("start", recipe=recipe.to_dict(), surgery=plan_record, classes=data.classes,
                  train_images=len(data.train), val_images=len(data.val), device=str(rt.device), world=rt.world)
        metrics["natural_acc_before"] = evaluate(model)
        if options.check_before is not None:
            options.check_before(metrics["natural_acc_before"], len(data.val))
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
                         checkpoint=checkpointer(rt, ctx.state_path, name, recipe, fingerprint, metrics),
                         history=history, stop_after=options.stop_after)

    metrics["natural_acc_after"] = evaluate(current)
    rt.barrier()
    return ScheduleResult(
        model=to_cpu_eval(current), surgery=surgery, recipe=recipe, history=history, metrics=metrics,
        resumed_from={"stage": state["stage"], "epoch": int(state["epoch"])} if state else None,
        bido_features=list(ctx.bido_points),
    )


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
