"""`audit` and `run_audit`: attack each model, judge the reconstructions, write one report.

`audit` is the library call behind `mishield audit`: it loads what it is given (files, specs or
`LoadedModel`s), runs `run_audit` and returns the typed `AuditReport` (`mishield.attack.results`)
whose `to_dict()` is report.json. Under `torchrun` every rank runs this with its own shard of the
classes and rank 0 writes the report (docs/architecture.md §3; the protocol and its concepts: §4).
"""

from __future__ import annotations

import datetime as _dt
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mishield import __version__
from mishield.attack.distributed import gather, shard_classes
from mishield.attack.evalmodel import Evaluator, check_compatible
from mishield.attack.metrics import deltas, knn_distances, summarize, topk_hits
from mishield.attack.ppa import AttackConfig, PPAAttack, out_of_memory_hint
from mishield.attack.priors import PixelPrior, Prior
from mishield.attack.report import (
    SHOW_RECONSTRUCTIONS,
    class_row,
    real_images,
    write_report,
)
from mishield.attack.results import AuditReport, ModelAudit, PrivacyGate
from mishield.errors import BadInputError, PrivacyGateError, UsageError
from mishield.preprocessing import Preprocessing
from mishield.progress import ProgressCallback
from mishield.runtime import Runtime
from mishield.training import evaluate_accuracy


@dataclass
class AuditTarget:
    """A classifier under audit (or the evaluation model) and what the report says about it."""

    name: str
    model: nn.Module
    preprocessing: Preprocessing
    num_classes: int
    info: dict = field(default_factory=dict)

    @classmethod
    def from_loaded(cls, loaded, name: str | None = None) -> AuditTarget:
        """From `mishield.models.LoadedModel`."""
        source = loaded.source
        label = name or (Path(source).name if source else str(loaded.arch))
        num_classes = loaded.num_classes
        if num_classes is None:
            raise BadInputError(f"cannot tell how many classes {label} has; pass `num_classes`.")
        info = {
            "source": str(source) if source else None,
            "sha256": loaded.source_sha256,
            "arch": loaded.arch,
            "kind": loaded.kind,
            "surgery": (loaded.recipe or {}).get("surgery"),
        }
        return cls(label, loaded.model, loaded.preprocessing, int(num_classes), info)


def parse_classes(spec: str | None, num_classes: int) -> list[int]:
    """`"0-9,17"` -> [0, ..., 9, 17]; None or "all" -> every class."""
    if spec is None or spec.strip().lower() in ("", "all"):
        return list(range(num_classes))
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not m:
            raise UsageError(f"`classes` takes ids and ranges like 0-9,17; cannot read {part!r}.")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise UsageError(f"`classes` range {part} runs backwards; write it as {hi}-{lo}.")
        out.extend(range(lo, hi + 1))
    unknown = sorted({c for c in out if c >= num_classes})
    if unknown:
        shown = ", ".join(map(str, unknown[:5])) + (" ..." if len(unknown) > 5 else "")
        raise BadInputError(f"`classes` names unknown class ids ({shown}); the model has classes 0-{num_classes - 1}.")
    return sorted(set(out))


def _unique_names(targets: list[AuditTarget]) -> list[str]:
    names, seen = [], {}
    for t in targets:
        n = seen.get(t.name, 0)
        seen[t.name] = n + 1
        names.append(t.name if n == 0 else f"{t.name} ({n + 1})")
    return names


def _check_inputs(targets: list[AuditTarget], evaluation: AuditTarget, data, classes: list[int]) -> None:
    if not data.train:
        raise BadInputError("the private data folder holds no training images; `data` must be an ImageFolder of the private classes.")
    for t in targets:
        if t.num_classes != targets[0].num_classes:
            raise BadInputError(
                f"{t.name} has {t.num_classes} classes but {targets[0].name} has {targets[0].num_classes}; "
                "models audited together must share their classes."
            )
        if data.num_classes != t.num_classes:
            raise BadInputError(
                f"the private data has {data.num_classes} class folders but {t.name} has {t.num_classes} classes; "
                "`data` must hold exactly the classes the model was trained on."
            )
        check_compatible(evaluation.num_classes, t.num_classes, evaluation.name, t.name)
    present = {y for _, y in data.train}
    missing = [c for c in classes if c not in present]
    if missing:
        raise BadInputError(f"the private data has no training images of class {missing[0]} ({data.classes[missing[0]]}); add some or leave it out of `classes`.")


def _attack_shard(
    target: AuditTarget,
    prior: Prior | None,
    evaluator: Evaluator,
    private: tuple[torch.Tensor, torch.Tensor],
    classes: list[int],
    config: AttackConfig,
    runtime: Runtime,
    progress: ProgressCallback | None,
) -> dict:
    """This rank's classes of one target: per-image outcomes plus the best images to show."""
    prior = prior if prior is not None else PixelPrior(target.preprocessing.input_size)
    try:
        result = PPAAttack(prior, target.model, target.preprocessing, config, runtime).run(classes, progress)
    except RuntimeError as err:  # torch.OutOfMemoryError is one
        hint = out_of_memory_hint(err, config.batch_size)
        if hint is None:
            raise
        raise hint from None
    k = config.keep
    labels = torch.tensor(classes).repeat_interleave(k)
    logits, features = evaluator.images(result.images.flatten(0, 1))
    knn = knn_distances(features, labels, *private)
    n = len(classes)
    return {
        "classes": classes,
        "top1": topk_hits(logits, labels, 1).view(n, k),
        "top5": topk_hits(logits, labels, 5).view(n, k),
        "knn": knn.view(n, k),
        "target_conf": result.final_scores,
        "shown": result.images[:, :SHOW_RECONSTRUCTIONS].clone(),
        "image_steps": result.image_steps,
        "seconds": result.seconds,
        "timings": result.timings,
        "prior": {**prior.describe(), "lr": config.resolve(prior).lr, "budget": config.resolve(prior).to_dict()},
    }


def _check_gate_threshold(max_attack_acc: float | None) -> None:
    if max_attack_acc is not None and not 0.0 <= max_attack_acc <= 1.0:
        raise UsageError(f"`max_attack_acc` is a fraction between 0 and 1 (0.4 means 40 %), got {max_attack_acc}.")


def run_audit(
    targets: list[AuditTarget],
    evaluation: AuditTarget,
    data,
    *,
    prior: Prior | None,
    config: AttackConfig,
    out_dir: str | Path,
    classes: list[int] | None = None,
    runtime: Runtime | None = None,
    max_attack_acc: float | None = None,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    provenance: dict | None = None,
    allow_weak_budget: bool = False,
) -> AuditReport | None:
    """Audit `targets` (the first is the baseline of the Δ columns); returns the report on rank 0.

    `data` is `mishield.data.DataSplits` of the private data; `prior=None` is the generator-free
    (BatchNorm-statistics) mode; `runtime` (default CPU) is `mishield.runtime.make_runtime`'s, whose
    rank and world size shard the classes under torchrun. Writes report.json, report.html and grids/ into `out_dir`.
    A gate below the documented minimum budget (`mishield.attack.budgets`) is refused unless
    `allow_weak_budget`; the report then carries `weak_audit` warnings.
    """
    _check_gate_threshold(max_attack_acc)
    if not targets:
        raise UsageError("name at least one model to audit.")
    weak = _weak_budget(targets, prior, config, max_attack_acc, allow_weak_budget)
    classes = list(range(targets[0].num_classes)) if classes is None else list(classes)
    _check_inputs(targets, evaluation, data, classes)
    runtime = runtime or Runtime(torch.device("cpu"))
    if runtime.world > len(classes):
        raise UsageError(f"torchrun started {runtime.world} processes for {len(classes)} audited classes; start at most {len(classes)}.")
    evaluator = Evaluator(evaluation.model, evaluation.preprocessing, runtime, config.batch_size)
    parts_per_model, natural_accs = _attack_all(targets, prior, evaluator, data, classes, config, runtime, progress)
    if not runtime.is_main:
        return None

    models, rows_per_model = _model_audits(targets, parts_per_model, natural_accs, data, classes)
    failing = [m.name for m in models if max_attack_acc is not None and m.metrics["attack_acc1"] > max_attack_acc]
    report = AuditReport(
        models=models, classes=classes, seed=config.seed, prior=parts_per_model[0][0]["prior"],
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), mishield_version=__version__,
        options={**config.to_dict(), "device": str(runtime.device), "bf16": runtime.amp_dtype is not None,
                 "channels_last": runtime.channels_last, "world_size": runtime.world, "max_attack_acc": max_attack_acc,
                 **(provenance or {})},
        data={"classes": data.classes, "train_images": len(data.train), "val_images": len(data.val)},
        eval_model={"name": evaluation.name, **evaluation.info, "preprocessing": evaluation.preprocessing.to_dict(),
                    "features": evaluator.feature_source},
        gate=None if max_attack_acc is None else PrivacyGate(max_attack_acc, not failing, failing),
        warnings=_warnings(targets, evaluation) + weak,
    )  # fmt: skip
    report.files = {k: str(v) for k, v in write_report(Path(out_dir), report, rows_per_model, overwrite).items()}
    return report


def _attack_all(targets, prior, evaluator, data, classes, config, runtime, progress) -> tuple[list, list]:
    """This rank's share of every target's attack, gathered on rank 0, and each target's natural accuracy."""
    mine = shard_classes(classes, runtime)
    mine_set = set(mine)
    private = evaluator.dataset([item for item in data.train if item[1] in mine_set], progress)
    parts_per_model, natural_accs = [], []
    for target in targets:
        payload = _attack_shard(target, prior, evaluator, private, mine, config, runtime, progress)
        parts_per_model.append(gather(payload, runtime))
        # Every rank takes part: evaluate_accuracy shards the held-out images itself.
        natural_accs.append(
            evaluate_accuracy(target.model, data.val, target.preprocessing, batch_size=config.batch_size, runtime=runtime)
            if data.val
            else None
        )
    return parts_per_model, natural_accs


def _model_audits(targets, parts_per_model, natural_accs, data, classes) -> tuple[list[ModelAudit], dict]:
    """One `ModelAudit` per target, Δ against the first, and the image strips of each class."""
    names = _unique_names(targets)
    models, rows_per_model = [], {}
    real: dict[tuple, torch.Tensor] = {}  # (class, image shape) -> private images to show, read once
    for mi, (target, parts) in enumerate(zip(targets, parts_per_model)):
        model, rows_per_model[mi] = _model_audit(mi, names[mi], target, parts, natural_accs[mi], data, classes, real)
        models.append(model)
    for m in models[1:]:
        m.delta = deltas(models[0].metrics, m.metrics)
    return models, rows_per_model


def _model_audit(mi, name, target, parts, natural_acc, data, classes, real) -> tuple[ModelAudit, dict]:
    where = {c: (p, i) for p in parts for i, c in enumerate(p["classes"])}
    top1, top5, knn = (torch.cat([where[c][0][key][where[c][1]] for c in classes]) for key in ("top1", "top5", "knn"))
    per_class, rows = [], {}
    for c in classes:
        p, i = where[c]
        s = summarize(p["top1"][i], p["top5"][i], p["knn"][i])
        per_class.append(
            {"class": c, "name": data.classes[c], "n": s["n"], "attack_acc1": s["attack_acc1"], "attack_acc5": s["attack_acc5"],
             "knn_dist": s["knn_dist"], "target_confidence": float(p["target_conf"][i].mean())}
        )  # fmt: skip
        shown = p["shown"][i]
        key = (c, tuple(shown.shape[1:]))
        if key not in real:
            real[key] = real_images(data.train, c, key[1])
        rows[c] = class_row(shown, real[key])
    image_steps = sum(p["image_steps"] for p in parts)
    seconds = max(p["seconds"] for p in parts)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:60]
    model = ModelAudit(
        name=name, info=dict(target.info), num_classes=target.num_classes, preprocessing=target.preprocessing.to_dict(),
        metrics={"natural_acc": natural_acc, "natural_acc_n": len(data.val), **summarize(top1, top5, knn)},
        per_class=per_class, grid=f"grids/{mi}_{slug}.png",
        timing={"image_steps": image_steps, "seconds": seconds, "image_steps_per_s": image_steps / seconds if seconds else None,
                **{k: max(p["timings"][k] for p in parts) for k in parts[0]["timings"]}},
    )  # fmt: skip
    return model, rows


def _weak_budget(targets, prior, config, max_attack_acc, allow_weak_budget) -> list[str]:
    """`weak_audit: ...` warnings for a budget below the minimum; refuses such a gate unless allowed."""
    from mishield.attack.budgets import budget_warnings

    image_prior = prior if prior is not None else PixelPrior(targets[0].preprocessing.input_size)
    weak = budget_warnings(config, image_prior, [t.model for t in targets])
    if weak and max_attack_acc is not None and not allow_weak_budget:
        raise UsageError(f"the attack budget is too weak to gate a release ({weak[0]}); raise the budget "
                         "(e.g. --preset default) or pass --allow-weak-budget to gate anyway with the audit flagged weak.")
    return [f"weak_audit: {w}." for w in weak]


def _warnings(targets: list[AuditTarget], evaluation: AuditTarget) -> list[str]:
    return [
        f"the evaluation model shares the architecture of {t.name} ({t.info['arch']}); the protocol asks for a different one."
        for t in targets
        if t.info.get("arch") and t.info.get("arch") == evaluation.info.get("arch")
    ]


def audit(
    models,
    *,
    data,
    prior,
    eval_model,
    out: str | Path = "mishield-audit",
    classes: str | list[int] | None = None,
    preset: str = "default",
    attack: dict | None = None,
    device: str = "auto",
    max_attack_acc: float | None = None,
    overwrite: bool = False,
    load_options: dict | None = None,
    eval_arch: str | None = None,
    trust_checkpoint: bool = False,
    progress: ProgressCallback | None = None,
    provenance: dict | None = None,
    allow_weak_budget: bool = False,
) -> AuditReport | None:
    """Audit `models` (files, architecture specs or `LoadedModel`s; the first is the Δ baseline).

    `data`: the private ImageFolder (a path, or `mishield.data.DataSplits`); `prior`: a prior
    file or `package.module:factory`, a `Prior`, or None / "none" for the generator-free mode;
    `eval_model`: the evaluation model (a path, spec or `LoadedModel`; `eval_arch` where its file
    names none). `preset` (`mishield.attack.ppa.PRESETS`: ci, default, ppa-facescrub, ppa-celeba,
    koh2024-facescrub) gives the attack size; `attack` overrides single values (samples,
    candidates, iterations, keep, final_augmentations, batch_size, seed, lr, betas, milestones,
    gamma, center_crop, selection_baseline, compile). `allow_weak_budget` lets a gate run below
    the minimum budget, flagged in the report. `load_options` go to `load_model` for each of `models`. Writes the report into
    `out` and returns it. Under torchrun, ranks other than 0 return None, or raise
    `PrivacyGateError` when the gate failed, so every process ends alike.
    """
    from mishield.attack.distributed import broadcast
    from mishield.attack.ppa import make_config
    from mishield.attack.report import check_outputs
    from mishield.runtime import make_runtime

    config = make_config(preset, **(attack or {}))
    _check_gate_threshold(max_attack_acc)
    # Refused before any loading: an existing report, or an output inside or over an input.
    named = [m for m in (models if isinstance(models, (list, tuple)) else [models]) if isinstance(m, (str, Path))]
    inputs = [x for x in (*named, eval_model, prior, data) if isinstance(x, (str, Path))]
    check_outputs(Path(out), overwrite, inputs=inputs)
    runtime = make_runtime(device)
    try:
        targets, evaluation, splits, image_prior = _load_inputs(
            models, data, prior, eval_model, eval_arch, load_options, trust_checkpoint, config)
        chosen = classes if isinstance(classes, list) else parse_classes(classes, targets[0].num_classes)
        report = run_audit(
            targets, evaluation, splits, prior=image_prior, config=config, out_dir=out, classes=chosen, runtime=runtime,
            max_attack_acc=max_attack_acc, overwrite=overwrite, progress=progress, provenance=provenance,
            allow_weak_budget=allow_weak_budget,
        )  # fmt: skip
        failing = broadcast(report.gate.failing if report and report.gate else [], runtime)
    finally:
        runtime.close()
    if failing and not runtime.is_main:
        raise PrivacyGateError("the privacy gate failed; rank 0 names the models and writes the report.")
    return report


def _load_inputs(models, data, prior, eval_model, eval_arch, load_options, trust_checkpoint, config):
    from mishield.attack.priors import load_prior
    from mishield.data import DataSplits, load_image_folders
    from mishield.models import LoadedModel, load_model

    def target(m, **options) -> AuditTarget:
        if isinstance(m, LoadedModel):
            return AuditTarget.from_loaded(m)
        return AuditTarget.from_loaded(load_model(str(m), trust_checkpoint=trust_checkpoint, **options))

    if isinstance(models, (str, Path)) or not isinstance(models, (list, tuple)):
        models = [models]
    if not models:
        raise UsageError("name at least one model to audit.")
    targets = [target(m, **(load_options or {})) for m in models]
    evaluation = target(eval_model, arch=eval_arch)
    splits = data if isinstance(data, DataSplits) else load_image_folders(data)
    if prior is None or (isinstance(prior, str) and prior.strip().lower() == "none"):
        image_prior = None
    elif isinstance(prior, Prior):
        image_prior = prior
    else:
        image_prior = load_prior(str(prior), target_input_size=targets[0].preprocessing.input_size,
                                 trust_checkpoint=trust_checkpoint, truncation=config.truncation, center_crop=config.center_crop)
    return targets, evaluation, splits, image_prior
