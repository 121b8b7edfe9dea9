"""`audit` and `run_audit`: attack each model, judge the reconstructions, write one report.

`audit` is the library call behind `mishield audit`: it loads what it is given (files, specs or
`LoadedModel`s), runs `run_audit` and returns the typed `AuditReport` (`mishield.attack.results`)
whose `to_dict()` is report.json. Under `torchrun` every rank runs this with its own shard of the
classes and rank 0 writes the report (docs/architecture.md §3; the protocol and its concepts: §4).
"""

from __future__ import annotations

import datetime as _dt
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mishield import __version__
from mishield.attack.distributed import gather, shard_classes
from mishield.attack.evalmodel import Evaluator, check_compatible
from mishield.attack.metrics import deltas, knn_distances, summarize, topk_hits
from mishield.attack.ppa import AttackConfig, PPAAttack, out_of_memory_hint
from mishield.attack.priors import PixelPrior, Prior
from mishield.attack.report import SHOW_RECONSTRUCTIONS, real_images, write_report
from mishield.attack.results import AuditReport, ModelAudit, PrivacyGate
from mishield.attack.stats import (
    MIN_TARGET_CONFIDENCE,
    chance_level,
    class_bootstrap,
    paired_difference,
)
from mishield.attack.stats import verdict as stats_verdict
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
    provenance: dict = field(default_factory=dict)  # what its file records: classes, training, metrics (trust checks)

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
        recipe = loaded.recipe or {}
        provenance = {k: recipe[k] for k in ("classes", "training", "metrics") if recipe.get(k) is not None}
        return cls(label, loaded.model, loaded.preprocessing, int(num_classes), info, provenance)


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
    seeds: int = 1,
) -> dict:
    """This rank's classes of one target over `seeds` repeats (seed, seed + 1, ...): per-image
    outcomes concatenated per class (seeds replicate the same classes), plus the images to show."""
    runs = [_attack_once(target, prior, evaluator, private, classes, replace(config, seed=config.seed + i), runtime, progress)
            for i in range(seeds)]  # fmt: skip
    first = runs[0]
    pooled = {key: None if any(r[key] is None for r in runs) else torch.cat([r[key] for r in runs], dim=1) for key in POOLED}
    return {
        **first, **pooled,
        "image_steps": sum(r["image_steps"] for r in runs),
        "seconds": sum(r["seconds"] for r in runs),
        "timings": {k: sum(r["timings"][k] for r in runs) for k in first["timings"]},
    }  # fmt: skip


# Per-class outcomes that `--seeds` pools (concatenated along the image axis); None where absent.
POOLED = ("top1", "top5", "knn", "target_conf", "unfiltered", "so_top1", "so_top5", "so_conf")


def _attack_once(target, prior, evaluator, private, classes, config, runtime, progress) -> dict:
    prior = prior if prior is not None else PixelPrior(target.preprocessing.input_size)
    candidates: list[torch.Tensor] = []

    def judge(images: torch.Tensor, labels: torch.Tensor) -> None:
        # Every optimised candidate, judged before final selection drops it: the unfiltered accuracy.
        candidates.append(topk_hits(evaluator.images(images)[0], labels, 1))

    try:
        result = PPAAttack(prior, target.model, target.preprocessing, config, runtime).run(classes, progress, on_candidates=judge)
    except RuntimeError as err:  # torch.OutOfMemoryError is one
        hint = out_of_memory_hint(err, config.batch_size)
        if hint is None:
            raise
        raise hint from None
    n, k = len(classes), config.keep
    labels = torch.tensor(classes).repeat_interleave(k)
    logits, features = evaluator.images(result.images.flatten(0, 1))
    knn = knn_distances(features, labels, *private)
    baseline = _selection_only(getattr(result, "selection_only", None), evaluator, classes)
    return {
        "classes": classes,
        "top1": topk_hits(logits, labels, 1).view(n, k),
        "top5": topk_hits(logits, labels, 5).view(n, k),
        "knn": knn.view(n, k),
        "target_conf": result.final_scores,
        "unfiltered": torch.cat(candidates).view(n, -1) if candidates else None,
        **baseline,
        "shown": result.images[:, :SHOW_RECONSTRUCTIONS].clone(),
        "image_steps": result.image_steps,
        "seconds": result.seconds,
        "timings": result.timings,
        "prior": {**prior.describe(), "lr": config.resolve(prior).lr, "budget": config.resolve(prior).to_dict()},
    }


def _selection_only(result, evaluator: Evaluator, classes: list[int]) -> dict:
    """The evaluator's verdict on the selection-only (I = 0) baseline, where the engine made one."""
    if result is None:
        return {"so_top1": None, "so_top5": None, "so_conf": None}
    n, k = result.images.shape[:2]
    labels = torch.tensor(classes).repeat_interleave(k)
    logits, _ = evaluator.images(result.images.flatten(0, 1))
    return {"so_top1": topk_hits(logits, labels, 1).view(n, k), "so_top5": topk_hits(logits, labels, 5).view(n, k),
            "so_conf": result.final_scores.float()}  # fmt: skip


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
    seeds: int = 1,
    allow_weak_evaluator: bool = False,
    allow_weak_budget: bool = False,
    val_fraction: float | None = None,
) -> AuditReport | None:
    """Audit `targets` (the first is the baseline of the Δ columns); returns the report on rank 0.

    `data` is `mishield.data.DataSplits` of the private data; `prior=None` is the generator-free
    (BatchNorm-statistics) mode; `runtime` (default CPU) is `mishield.runtime.make_runtime`'s, whose
    rank and world size shard the classes under torchrun. Writes report.json, report.html and grids/ into `out_dir`.
    `seeds` repeats every attack with seeds config.seed, config.seed + 1, ... and pools them per class.
    The trust checks (`mishield.attack.trust`) run first; `allow_weak_evaluator` turns an evaluator
    below the accuracy floor from a refusal into a warning, and then no gate may be set.
    A gate below the documented minimum budget (`mishield.attack.budgets`) is refused unless
    `allow_weak_budget`; the report then carries `weak_audit` warnings.
    """
    _check_gate_threshold(max_attack_acc)
    if seeds < 1:
        raise UsageError(f"`seeds` must be at least 1, got {seeds}.")
    if not targets:
        raise UsageError("name at least one model to audit.")
    weak = _weak_budget(targets, prior, config, max_attack_acc, allow_weak_budget)
    classes = list(range(targets[0].num_classes)) if classes is None else list(classes)
    _check_inputs(targets, evaluation, data, classes)
    runtime = runtime or Runtime(torch.device("cpu"))
    if runtime.world > len(classes):
        raise UsageError(f"torchrun started {runtime.world} processes for {len(classes)} audited classes; start at most {len(classes)}.")
    evaluator = Evaluator(evaluation.model, evaluation.preprocessing, runtime, config.batch_size)
    trust, trust_warnings, natural_accs = _trust(targets, evaluation, evaluator, data, prior, config, runtime,
                                                 max_attack_acc, allow_weak_evaluator)
    parts_per_model, natural_accs = _attack_all(targets, prior, evaluator, data, classes, config, runtime, progress,
                                                seeds, natural_accs)
    if not runtime.is_main:
        return None

    ran = parts_per_model[0][0]["prior"]  # the budget resolved against the prior (iterations, lr, schedule)
    budget = {**config.to_dict(), **(ran.get("budget") or {"lr": ran["lr"]}), "seeds": [config.seed + i for i in range(seeds)]}
    judged = Judging(max_attack_acc, budget, (trust or {}).get("accuracy"))
    models, shown, real = _model_audits(targets, parts_per_model, natural_accs, data, classes, judged)
    report = AuditReport(
        models=models, classes=classes, seed=config.seed, prior=parts_per_model[0][0]["prior"],
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), mishield_version=__version__,
        options={**config.to_dict(), "device": str(runtime.device), "bf16": runtime.amp_dtype is not None,
                 "channels_last": runtime.channels_last, "world_size": runtime.world, "max_attack_acc": max_attack_acc,
                 "seeds": budget["seeds"], **(provenance or {})},
        data={"classes": data.classes, "train_images": len(data.train), "val_images": len(data.val)},
        eval_model={"name": evaluation.name, **evaluation.info, "preprocessing": evaluation.preprocessing.to_dict(),
                    "features": evaluator.feature_source, "trust": trust},
        gate=None if max_attack_acc is None else _gate(models, max_attack_acc),
        warnings=_warnings(targets, evaluation) + trust_warnings + weak,
    )  # fmt: skip
    report.files = {k: str(v) for k, v in write_report(Path(out_dir), report, shown, real, overwrite).items()}
    return report


def _attack_shape(prior: Prior | None, targets: list[AuditTarget]) -> tuple[int, int, int]:
    """The images the attack makes: the prior's output, or the (first) target's input for the pixel prior."""
    return tuple(prior.image_shape) if prior is not None else tuple(targets[0].preprocessing.input_size)


def _natural_acc(target: AuditTarget, data, config: AttackConfig, runtime: Runtime) -> float | None:
    # Every rank takes part: evaluate_accuracy shards the held-out images itself.
    if not data.val:
        return None
    return evaluate_accuracy(target.model, data.val, target.preprocessing, batch_size=config.batch_size, runtime=runtime)


def _trust(targets, evaluation, evaluator, data, prior, config, runtime, max_attack_acc, allow_weak) -> tuple[dict, list, list | None]:
    """The trust checks before any attack (`mishield.attack.trust`): the evaluator's record, warnings,
    and, for a gate, every target's natural accuracy (measured early so a chance-level target is refused before the attack)."""
    from mishield.attack import trust

    if allow_weak and max_attack_acc is not None:
        raise UsageError("`allow_weak_evaluator` is for smoke tests and cannot be combined with the `max_attack_acc` gate.")
    record, warnings = trust.check_evaluator(evaluator, evaluation, targets, data, _attack_shape(prior, targets),
                                             allow_weak=allow_weak)
    quality = trust.prior_quality(prior, evaluator, data, seed=config.seed)
    if quality is not None:  # in the report's `prior` (describe() carries the description)
        prior.description["quality"] = quality
        if quality["weak"]:
            warnings.append(trust.weak_prior_warning(quality))
    if max_attack_acc is None:
        return record, warnings, None
    natural_accs = [_natural_acc(t, data, config, runtime) for t in targets]
    for t, acc in zip(targets, natural_accs):
        trust.check_target_for_gate(t.name, acc, len(data.val), t.num_classes)
    return record, warnings, natural_accs


def _attack_all(targets, prior, evaluator, data, classes, config, runtime, progress, seeds=1, natural_accs=None) -> tuple[list, list]:
    """This rank's share of every target's attack, gathered on rank 0, and each target's natural accuracy."""
    mine = shard_classes(classes, runtime)
    mine_set = set(mine)
    # Private images degraded to the attack's resolution, so KNN compares like with like (docs/audit.md "Trust checks").
    private = evaluator.dataset([item for item in data.train if item[1] in mine_set], progress,
                                image_shape=_attack_shape(prior, targets))
    parts_per_model = []
    for target in targets:
        payload = _attack_shard(target, prior, evaluator, private, mine, config, runtime, progress, seeds)
        parts_per_model.append(gather(payload, runtime))
    if natural_accs is None:
        natural_accs = [_natural_acc(t, data, config, runtime) for t in targets]
    return parts_per_model, natural_accs


@dataclass(frozen=True)
class Judging:
    """What every model is judged against: the gate's threshold (None: no gate), the attack budget
    that ran, and the evaluator's own accuracy where it was measured (None otherwise)."""

    threshold: float | None
    budget: dict
    evaluator_acc: float | None = None


def _gate(models: list[ModelAudit], threshold: float) -> PrivacyGate:
    """Passes only when every model's verdict is "passes"; inconclusive audits fail it too."""
    failing = [m.name for m in models if not (m.verdict or {}).get("passed")]
    inconclusive = [m.name for m in models if (m.verdict or {}).get("status") == "inconclusive"]
    reasons = {m.name: m.verdict["reason"] for m in models if m.name in failing}
    return PrivacyGate(threshold, not failing, failing, inconclusive=inconclusive, reasons=reasons)


def _model_audits(targets, parts_per_model, natural_accs, data, classes, judging: Judging) -> tuple[list[ModelAudit], dict, dict]:
    """One `ModelAudit` per target, Δ and the paired difference against the first, and the images
    to show: `shown[model][class]` reconstructions, `real[class]` private images."""
    names = _unique_names(targets)
    models, shown, hits = [], {}, []
    real: dict[int, torch.Tensor] = {}  # class -> private images to show, read once
    for mi, (target, parts) in enumerate(zip(targets, parts_per_model)):
        model, shown[mi], top1 = _model_audit(mi, names[mi], target, parts, natural_accs[mi], data, classes, judging)
        for c, images in shown[mi].items():
            if c not in real:
                real[c] = real_images(data.train, c, tuple(images.shape[1:]))
        models.append(model)
        hits.append(top1)
    for m, h in zip(models[1:], hits[1:]):
        m.delta = deltas(models[0].metrics, m.metrics)
        paired = paired_difference(hits[0], h)
        m.metrics["paired_diff_acc1"] = paired.estimate
        m.metrics["paired_diff_acc1_interval"] = paired.to_dict()
    return models, shown, real


def _per_class(parts, classes: list[int], key: str) -> torch.Tensor | None:
    """[classes, images] of one pooled outcome, rows in `classes` order (None where not measured)."""
    where = {c: (p, i) for p in parts for i, c in enumerate(p["classes"])}
    if any(where[c][0][key] is None for c in classes):
        return None
    return torch.stack([where[c][0][key][where[c][1]] for c in classes]).float()


def _model_audit(mi, name, target, parts, natural_acc, data, classes, judging: Judging) -> tuple[ModelAudit, dict, np.ndarray]:
    top1, top5, knn, conf, unfiltered, so_top1 = (
        _per_class(parts, classes, key) for key in ("top1", "top5", "knn", "target_conf", "unfiltered", "so_top1"))
    per_class = []
    for row, c in enumerate(classes):
        s = summarize(top1[row], top5[row], knn[row])
        per_class.append(
            {"class": c, "name": data.classes[c], "n": s["n"], "attack_acc1": s["attack_acc1"], "attack_acc5": s["attack_acc5"],
             "knn_dist": s["knn_dist"], "target_confidence": float(conf[row].mean()),
             "reached": bool(conf[row].mean() >= MIN_TARGET_CONFIDENCE),
             "unfiltered_acc1": None if unfiltered is None else float(unfiltered[row].mean()),
             "selection_only_acc1": None if so_top1 is None else float(so_top1[row].mean())}
        )  # fmt: skip
    metrics = {"natural_acc": natural_acc, "natural_acc_n": len(data.val), **summarize(top1.flatten(), top5.flatten(), knn.flatten()),
               **_interval_metrics(top1, top5, unfiltered, so_top1, target.num_classes),
               "target_confidence": float(conf.mean()), "evaluator_acc": judging.evaluator_acc,
               "paired_diff_acc1": None, "paired_diff_acc1_interval": None}  # fmt: skip
    iv1 = class_bootstrap(top1.numpy())
    judged = stats_verdict(iv1, judging.threshold, chance=metrics["chance_acc1"], target_confidence=conf.numpy())
    where = {c: (p, i) for p in parts for i, c in enumerate(p["classes"])}
    image_steps = sum(p["image_steps"] for p in parts)
    seconds = max(p["seconds"] for p in parts)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:60]
    model = ModelAudit(
        name=name, info=dict(target.info), num_classes=target.num_classes, preprocessing=target.preprocessing.to_dict(),
        metrics=metrics, per_class=per_class, grid=f"grids/{mi}_{slug}.png", budget=dict(judging.budget), verdict=judged.to_dict(),
        timing={"image_steps": image_steps, "seconds": seconds, "image_steps_per_s": image_steps / seconds if seconds else None,
                **{k: max(p["timings"][k] for p in parts) for k in parts[0]["timings"]}},
    )  # fmt: skip
    return model, {c: where[c][0]["shown"][where[c][1]] for c in classes}, top1.numpy()


def _interval_metrics(top1, top5, unfiltered, so_top1, num_classes: int) -> dict:
    """Class-bootstrap intervals @1 and @5, chance levels, unfiltered and selection-only accuracy."""
    iv1, iv5 = class_bootstrap(top1.numpy()), class_bootstrap(top5.numpy())
    so = None if so_top1 is None else class_bootstrap(so_top1.numpy())
    return {
        "interval_method": iv1.method,
        "attack_acc1_ci95": [iv1.low, iv1.high],
        "attack_acc1_interval": iv1.to_dict(),
        "attack_acc5_ci95": [iv5.low, iv5.high],
        "attack_acc5_interval": iv5.to_dict(),
        "chance_acc1": chance_level(num_classes, 1),
        "chance_acc5": chance_level(num_classes, 5),
        "unfiltered_acc1": None if unfiltered is None else float(unfiltered.mean()),
        "unfiltered_n": None if unfiltered is None else int(unfiltered.numel()),
        "selection_only_acc1": None if so is None else so.estimate,
        "selection_only_acc1_interval": None if so is None else so.to_dict(),
    }


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
    seeds: int = 1,
    allow_weak_evaluator: bool = False,
    allow_weak_budget: bool = False,
    val_fraction: float | None = None,
) -> AuditReport | None:
    """Audit `models` (files, architecture specs or `LoadedModel`s; the first is the Δ baseline).

    `data`: the private ImageFolder (a path, or `mishield.data.DataSplits`); `prior`: a prior
    file or `package.module:factory`, a `Prior`, or None / "none" for the generator-free mode;
    `eval_model`: the evaluation model (a path, spec or `LoadedModel`; `eval_arch` where its file
    names none). `preset` (`mishield.attack.ppa.PRESETS`: ci, default, ppa-facescrub, ppa-celeba,
    koh2024-facescrub) gives the attack size; `attack` overrides single values (samples,
    candidates, iterations, keep, final_augmentations, batch_size, seed, lr, betas, milestones,
    gamma, center_crop, selection_baseline, compile); `seeds` repeats the attack with seeds seed,
    seed + 1, ... pooled per class. `allow_weak_budget` lets a gate run below the minimum budget,
    flagged in the report. `load_options` go to `load_model` for each of `models`. Natural accuracy
    is measured on `data`'s val/ folder, else on a seeded `val_fraction` of it (default 10 %). Writes the report into
    `out` and returns it. Under torchrun, ranks other than 0 return None, or raise
    `PrivacyGateError` when the gate failed, so every process ends alike. The trust checks
    (docs/audit.md "Trust checks") refuse an untrustworthy evaluator, a chance-level target under
    a gate and private images found among a prior file's training images; `allow_weak_evaluator`
    (smoke tests only, never with a gate) lets an evaluator below the accuracy floor through with a warning.
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
            models, data, prior, eval_model, eval_arch, load_options, trust_checkpoint, config, val_fraction)
        chosen = classes if isinstance(classes, list) else parse_classes(classes, targets[0].num_classes)
        report = run_audit(
            targets, evaluation, splits, prior=image_prior, config=config, out_dir=out, classes=chosen, runtime=runtime,
            max_attack_acc=max_attack_acc, overwrite=overwrite, progress=progress, provenance=provenance, seeds=seeds,
            allow_weak_evaluator=allow_weak_evaluator, allow_weak_budget=allow_weak_budget,
        )  # fmt: skip
        failing = broadcast(report.gate.failing if report and report.gate else [], runtime)
    finally:
        runtime.close()
    if failing and not runtime.is_main:
        raise PrivacyGateError("the privacy gate failed; rank 0 names the models and writes the report.")
    return report


def _load_inputs(models, data, prior, eval_model, eval_arch, load_options, trust_checkpoint, config, val_fraction=None):
    from mishield.attack.priors import load_prior
    from mishield.attack.trust import check_prior_overlap
    from mishield.data import (
        DataSplits,
        fit_resolution,
        load_image_folders,
        resolve_val_fraction,
    )
    from mishield.models import LoadedModel, load_model

    if isinstance(data, DataSplits):
        splits = data
    else:
        splits = load_image_folders(data, val_fraction=resolve_val_fraction(data, None, val_fraction), seed=config.seed)
    size_given = (load_options or {}).get("input_size") is not None

    def target(m, **options) -> AuditTarget:
        if isinstance(m, LoadedModel):
            return AuditTarget.from_loaded(m)
        loaded = load_model(str(m), trust_checkpoint=trust_checkpoint, **options)
        # a plain state dict does not say its resolution: the private data does (as in harden)
        return AuditTarget.from_loaded(fit_resolution(loaded, splits.train, size_given))

    if isinstance(models, (str, Path)) or not isinstance(models, (list, tuple)):
        models = [models]
    if not models:
        raise UsageError("name at least one model to audit.")
    targets = [target(m, **(load_options or {})) for m in models]
    evaluation = target(eval_model, arch=eval_arch)
    if prior is None or (isinstance(prior, str) and prior.strip().lower() == "none"):
        image_prior = None
    elif isinstance(prior, Prior):
        image_prior = prior
    else:
        image_prior = load_prior(str(prior), target_input_size=targets[0].preprocessing.input_size,
                                 trust_checkpoint=trust_checkpoint, truncation=config.truncation, center_crop=config.center_crop)
        # A prior file that lists its training images' hashes: refuse private images among them.
        image_prior.description["provenance_check"] = check_prior_overlap(prior, splits)
    return targets, evaluation, splits, image_prior
