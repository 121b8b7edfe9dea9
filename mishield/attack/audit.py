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

import torch
from torch import nn

from mishield import __version__
from mishield.attack.attacks import ATTACKS, AttackKind
from mishield.attack.distributed import gather, shard_classes
from mishield.attack.evalmodel import Evaluator, check_compatible
from mishield.attack.judging import (
    EVALUATOR_OUTCOMES,
    Judging,
    gate,
    grid_name,
    judge_row,
    model_audits,
)
from mishield.attack.metrics import knn_distances, topk_hits
from mishield.attack.ppa import AttackConfig, PPAAttack, out_of_memory_hint
from mishield.attack.priors import PixelPrior, Prior
from mishield.attack.report import SHOW_RECONSTRUCTIONS, real_images, write_report
from mishield.attack.results import AuditReport
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


def _check_inputs(targets: list[AuditTarget], evaluations: list[AuditTarget], data, classes: list[int]) -> None:
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
        for evaluation in evaluations:
            check_compatible(evaluation.num_classes, t.num_classes, evaluation.name, t.name)
    present = {y for _, y in data.train}
    missing = [c for c in classes if c not in present]
    if missing:
        raise BadInputError(f"the private data has no training images of class {missing[0]} ({data.classes[missing[0]]}); add some or leave it out of `classes`.")


def _attack_shard(target, prior, evaluators, privates, classes, config, runtime, progress, seeds=1, surrogates=()) -> dict:
    """This rank's classes of one target under one attack over `seeds` repeats (seed, seed + 1, ...):
    per-image outcomes concatenated per class (seeds replicate the same classes), plus the images to show."""
    runs = [_attack_once(target, prior, evaluators, privates, classes, replace(config, seed=config.seed + i), runtime, progress, surrogates)
            for i in range(seeds)]  # fmt: skip
    first = runs[0]

    def pool(values: list) -> torch.Tensor | None:
        return None if any(v is None for v in values) else torch.cat(values, dim=1)

    return {
        **first,
        "target_conf": pool([r["target_conf"] for r in runs]),
        "evals": [{k: pool([r["evals"][e][k] for r in runs]) for k in EVALUATOR_OUTCOMES} for e in range(len(evaluators))],
        "image_steps": sum(r["image_steps"] for r in runs),
        "seconds": sum(r["seconds"] for r in runs),
        "timings": {k: sum(r["timings"][k] for r in runs) for k in first["timings"]},
    }


def _attack_once(target, prior, evaluators, privates, classes, config, runtime, progress, surrogates=()) -> dict:
    prior = prior if prior is not None else PixelPrior(target.preprocessing.input_size)
    candidates: list[list[torch.Tensor]] = [[] for _ in evaluators]

    def judge(images: torch.Tensor, labels: torch.Tensor) -> None:
        # Every optimised candidate, judged before final selection drops it: the unfiltered accuracy.
        for seen, evaluator in zip(candidates, evaluators):
            seen.append(topk_hits(evaluator.images(images)[0], labels, 1))

    extra = {"surrogates": list(surrogates)} if surrogates else {}
    try:
        result = PPAAttack(prior, target.model, target.preprocessing, config, runtime, **extra).run(classes, progress, on_candidates=judge)
    except RuntimeError as err:  # torch.OutOfMemoryError is one
        hint = out_of_memory_hint(err, config.batch_size)
        if hint is None:
            raise
        raise hint from None
    n, k = len(classes), config.keep
    labels = torch.tensor(classes).repeat_interleave(k)
    evals = []
    for evaluator, private, seen in zip(evaluators, privates, candidates):
        logits, features = evaluator.images(result.images.flatten(0, 1))
        evals.append({"top1": topk_hits(logits, labels, 1).view(n, k), "top5": topk_hits(logits, labels, 5).view(n, k),
                      "knn": knn_distances(features, labels, *private).view(n, k),
                      "unfiltered": torch.cat(seen).view(n, -1) if seen else None,
                      **_selection_only(getattr(result, "selection_only", None), evaluator, classes)})  # fmt: skip
    resolved = config.resolve(prior)
    return {
        "classes": classes,
        "target_conf": result.final_scores,
        "evals": evals,
        "shown": result.images[:, :SHOW_RECONSTRUCTIONS].clone(),
        "image_steps": result.image_steps,
        "seconds": result.seconds,
        "timings": result.timings,
        "prior": {**prior.describe(), "lr": resolved.lr, "budget": resolved.to_dict()},
    }


def _selection_only(result, evaluator: Evaluator, classes: list[int]) -> dict:
    """The evaluator's verdict on the selection-only (I = 0) baseline, where the engine made one."""
    if result is None:
        return {"so_top1": None, "so_top5": None}
    n, k = result.images.shape[:2]
    labels = torch.tensor(classes).repeat_interleave(k)
    logits, _ = evaluator.images(result.images.flatten(0, 1))
    return {"so_top1": topk_hits(logits, labels, 1).view(n, k), "so_top5": topk_hits(logits, labels, 5).view(n, k)}


def _check_gate_threshold(max_attack_acc: float | None) -> None:
    if max_attack_acc is not None and not 0.0 <= max_attack_acc <= 1.0:
        raise UsageError(f"`max_attack_acc` is a fraction between 0 and 1 (0.4 means 40 %), got {max_attack_acc}.")


def _attack_config(config: AttackConfig, kind: AttackKind) -> AttackConfig:
    """The shared budget with this attack's loss."""
    return config if kind.loss == config.loss else replace(config, loss=kind.loss).validate()


def run_audit(
    targets: list[AuditTarget],
    evaluation: AuditTarget | list[AuditTarget],
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
    attacks: list[AttackKind] | None = None,
    surrogates: list[list] | None = None,
    extra_warnings: list[str] | None = None,
) -> AuditReport | None:
    """Audit `targets` (the first is the baseline of the Δ columns); returns the report on rank 0.

    `evaluation` is one evaluation model or several (different architectures): each judges every
    reconstruction and each row reads the most leaky. `attacks` (default PPA alone) are the
    `mishield.attack.attacks.ATTACKS` to run on every target; a model is judged by its worst case.
    `surrogates[i]` are target i's surrogate models as (module, Preprocessing) pairs, which attacks
    with `surrogates=True` optimise through beside the target.
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
    evaluations = list(evaluation) if isinstance(evaluation, (list, tuple)) else [evaluation]
    attacks = attacks or [ATTACKS["ppa"]]
    surrogates = surrogates or [[] for _ in targets]
    if seeds < 1:
        raise UsageError(f"`seeds` must be at least 1, got {seeds}.")
    if not targets:
        raise UsageError("name at least one model to audit.")
    if not evaluations:
        raise UsageError("name at least one evaluation model.")
    _check_surrogates(targets, attacks, surrogates)
    weak = _weak_budget(targets, prior, config, max_attack_acc, allow_weak_budget)
    classes = list(range(targets[0].num_classes)) if classes is None else list(classes)
    _check_inputs(targets, evaluations, data, classes)
    runtime = runtime or Runtime(torch.device("cpu"))
    if runtime.world > len(classes):
        raise UsageError(f"torchrun started {runtime.world} processes for {len(classes)} audited classes; start at most {len(classes)}.")
    evaluators = [Evaluator(e.model, e.preprocessing, runtime, config.batch_size) for e in evaluations]
    trust, trust_warnings, natural_accs = _trust(targets, evaluations, evaluators, data, prior, config, runtime,
                                                 max_attack_acc, allow_weak_evaluator)
    parts, natural_accs = _attack_all(targets, prior, evaluators, data, classes, config, runtime, progress,
                                      seeds, natural_accs, attacks, surrogates)
    if not runtime.is_main:
        return None

    warnings = [*_warnings(targets, evaluations), *trust_warnings, *weak, *_surrogate_warnings(targets, attacks, surrogates), *(extra_warnings or ())]
    return _report(targets, evaluations, evaluators, trust, parts, natural_accs, data, classes, prior, config, runtime,
                   max_attack_acc, seeds, attacks, warnings, provenance, Path(out_dir), overwrite)


def _report(targets, evaluations, evaluators, trust, parts, natural_accs, data, classes, prior, config, runtime,
            max_attack_acc, seeds, attacks, warnings, provenance, out_dir: Path, overwrite: bool) -> AuditReport:  # fmt: skip
    """Judge every (model, attack) row and write the report files (rank 0)."""
    seed_list = [config.seed + i for i in range(seeds)]
    budgets = {}
    for kind, p in zip(attacks, parts[0]):
        ran = p[0]["prior"]  # the budget resolved against the prior (iterations, lr, schedule)
        budgets[kind.name] = {**config.to_dict(), **(ran.get("budget") or {"lr": ran["lr"]}), "seeds": seed_list}
    judging = Judging(max_attack_acc, budgets, [{"name": e.name, "accuracy": (t or {}).get("accuracy")} for e, t in zip(evaluations, trust)])
    names = _unique_names(targets)
    rows = [[judge_row(kind.name, p, classes, data.classes, t.num_classes, (acc, len(data.val)), judging, grid_name(mi, names[mi], kind.name, len(attacks)))
             for kind, p in zip(attacks, parts[mi])] for mi, t, acc in zip(range(len(targets)), targets, natural_accs)]  # fmt: skip
    models = model_audits(targets, names, rows)
    shown = {r.grid: r.shown for model_rows in rows for r in model_rows}
    real = {c: real_images(data.train, c, tuple(next(iter(shown.values()))[c].shape[1:])) for c in classes}
    eval_records = [{"name": e.name, **e.info, "preprocessing": e.preprocessing.to_dict(), "features": ev.feature_source, "trust": t}
                    for e, ev, t in zip(evaluations, evaluators, trust)]  # fmt: skip
    report = AuditReport(
        models=models, classes=classes, seed=config.seed, prior=parts[0][0][0]["prior"],
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), mishield_version=__version__,
        options={**config.to_dict(), "attacks": [k.name for k in attacks], "device": str(runtime.device),
                 "bf16": runtime.amp_dtype is not None, "channels_last": runtime.channels_last, "world_size": runtime.world,
                 "max_attack_acc": max_attack_acc, "seeds": seed_list, **(provenance or {})},
        data={"classes": data.classes, "train_images": len(data.train), "val_images": len(data.val)},
        eval_model=eval_records[0], eval_models=eval_records,
        gate=None if max_attack_acc is None else gate(models, max_attack_acc),
        warnings=warnings,
        prior_samples=None if prior is None or prior.kind == "pixels" else PRIOR_SAMPLES,
    )  # fmt: skip
    samples = None if report.prior_samples is None else _prior_samples(prior, config.seed, runtime.device)
    report.files = {k: str(v) for k, v in write_report(out_dir, report, shown, real, overwrite, samples).items()}
    return report


# The grid of prior samples the report shows, so a reader can judge what the attacker draws with.
PRIOR_SAMPLES = "grids/prior_samples.png"


@torch.no_grad()
def _prior_samples(prior: Prior, seed: int, device: torch.device, n: int = 16) -> torch.Tensor:
    from mishield.attack.ppa import to_uint8

    latents = prior.sample(n, torch.Generator().manual_seed(seed + 7919), device)
    return to_uint8(prior.generate(latents)).cpu()


def _check_surrogates(targets, attacks, surrogates) -> None:
    if len(surrogates) != len(targets):
        raise UsageError(f"`surrogates` needs one list per audited model ({len(targets)}), got {len(surrogates)}.")
    if any(k.surrogates for k in attacks):
        missing = [t.name for t, s in zip(targets, surrogates) if not s]
        if missing:
            raise UsageError(f"the lomma attack optimises through surrogates distilled from each model, and {', '.join(missing)} "
                             "has none; train them with `mishield surrogate train` and pass them with `surrogates`.")


def _surrogate_warnings(targets, attacks, surrogates) -> list[str]:
    if any(k.surrogates for k in attacks):
        return []
    return [f"surrogates of {t.name} were given but no chosen attack uses them (add lomma to `attacks`)." for t, s in zip(targets, surrogates) if s]


def _attack_shape(prior: Prior | None, targets: list[AuditTarget]) -> tuple[int, int, int]:
    """The images the attack makes: the prior's output, or the (first) target's input for the pixel prior."""
    return tuple(prior.image_shape) if prior is not None else tuple(targets[0].preprocessing.input_size)


def _natural_acc(target: AuditTarget, data, config: AttackConfig, runtime: Runtime) -> float | None:
    # Every rank takes part: evaluate_accuracy shards the held-out images itself.
    if not data.val:
        return None
    return evaluate_accuracy(target.model, data.val, target.preprocessing, batch_size=config.batch_size, runtime=runtime)


def _trust(targets, evaluations, evaluators, data, prior, config, runtime, max_attack_acc, allow_weak) -> tuple[list, list, list | None]:
    """The trust checks before any attack (`mishield.attack.trust`): each evaluator's record, warnings,
    and, for a gate, every target's natural accuracy (measured early so a chance-level target is refused before the attack)."""
    from mishield.attack import trust

    if allow_weak and max_attack_acc is not None:
        raise UsageError("`allow_weak_evaluator` is for smoke tests and cannot be combined with the `max_attack_acc` gate.")
    records, warnings = [], []
    for evaluation, evaluator in zip(evaluations, evaluators):
        record, said = trust.check_evaluator(evaluator, evaluation, targets, data, _attack_shape(prior, targets), allow_weak=allow_weak)
        records.append(record)
        warnings += said
    quality = trust.prior_quality(prior, evaluators[0], data, seed=config.seed)
    if quality is not None:  # in the report's `prior` (describe() carries the description)
        prior.description["quality"] = quality
        if quality["weak"]:
            warnings.append(trust.weak_prior_warning(quality))
    if max_attack_acc is None:
        return records, warnings, None
    natural_accs = [_natural_acc(t, data, config, runtime) for t in targets]
    for t, acc in zip(targets, natural_accs):
        trust.check_target_for_gate(t.name, acc, len(data.val), t.num_classes)
    return records, warnings, natural_accs


def _attack_all(targets, prior, evaluators, data, classes, config, runtime, progress, seeds, natural_accs,
                attacks, surrogates) -> tuple[list, list]:  # fmt: skip
    """This rank's share of every (target, attack) run, gathered on rank 0 as parts[target][attack],
    and each target's natural accuracy (measured here unless the trust checks already did)."""
    mine = shard_classes(classes, runtime)
    mine_set = set(mine)
    # Private images degraded to the attack's resolution, so KNN compares like with like (docs/audit.md "Trust checks").
    items = [item for item in data.train if item[1] in mine_set]
    privates = [e.dataset(items, progress, image_shape=_attack_shape(prior, targets)) for e in evaluators]
    parts = []
    for target, own in zip(targets, surrogates):
        per_attack = []
        for kind in attacks:
            payload = _attack_shard(target, prior, evaluators, privates, mine, _attack_config(config, kind), runtime, progress, seeds,
                                    own if kind.surrogates else ())  # fmt: skip
            per_attack.append(gather(payload, runtime))
        parts.append(per_attack)
    if natural_accs is None:
        natural_accs = [_natural_acc(t, data, config, runtime) for t in targets]
    return parts, natural_accs


def _weak_budget(targets, prior, config, max_attack_acc, allow_weak_budget) -> list[str]:
    """`weak_audit: ...` warnings for a budget below the minimum; refuses such a gate unless allowed."""
    from mishield.attack.budgets import budget_warnings

    image_prior = prior if prior is not None else PixelPrior(targets[0].preprocessing.input_size)
    weak = budget_warnings(config, image_prior, [t.model for t in targets])
    if weak and max_attack_acc is not None and not allow_weak_budget:
        raise UsageError(f"the attack budget is too weak to gate a release ({weak[0]}); raise the budget "
                         "(e.g. --preset default) or pass --allow-weak-budget to gate anyway with the audit flagged weak.")
    return [f"weak_audit: {w}." for w in weak]


def _warnings(targets: list[AuditTarget], evaluations: list[AuditTarget]) -> list[str]:
    return [
        f"the evaluation model {e.name} shares the architecture of {t.name} ({t.info['arch']}); the protocol asks for a different one."
        for e in evaluations
        for t in targets
        if t.info.get("arch") and t.info.get("arch") == e.info.get("arch")
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
    attacks: str | list[str] | None = None,
    surrogates=None,
) -> AuditReport | None:
    """Audit `models` (files, architecture specs or `LoadedModel`s; the first is the Δ baseline).

    `data`: the private ImageFolder (a path, or `mishield.data.DataSplits`); `prior`: a prior
    file or `package.module:factory`, a `Prior`, or None / "none" for the generator-free mode;
    `eval_model`: the evaluation model, or a list of several (different architectures; each row
    reads the most leaky) — paths, specs or `LoadedModel`s (`eval_arch` where a file names none).
    `attacks`: "ppa" (default), "lomma" or "ppa,lomma" (`mishield.attack.attacks.ATTACKS`); each
    model is judged by its worst case. `surrogates`: surrogate model files (`mishield surrogate
    train`), each matched to the audited model it was distilled from by that model's SHA-256;
    the lomma attack needs at least one per model. `preset` (`mishield.attack.ppa.PRESETS`: ci, default, ppa-facescrub, ppa-celeba,
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
    from mishield.attack.attacks import parse_attacks
    from mishield.attack.distributed import broadcast
    from mishield.attack.ppa import make_config
    from mishield.attack.report import check_outputs
    from mishield.runtime import make_runtime

    config = make_config(preset, **(attack or {}))
    kinds = parse_attacks(attacks)
    _check_gate_threshold(max_attack_acc)
    # Refused before any loading: an existing report, or an output inside or over an input.
    named = [m for m in (models if isinstance(models, (list, tuple)) else [models]) if isinstance(m, (str, Path))]
    evals = list(eval_model) if isinstance(eval_model, (list, tuple)) else [eval_model]
    inputs = [x for x in (*named, *evals, *(surrogates or ()), prior, data) if isinstance(x, (str, Path))]
    check_outputs(Path(out), overwrite, inputs=inputs)
    runtime = make_runtime(device)
    try:
        targets, evaluations, splits, image_prior = _load_inputs(
            models, data, prior, evals, eval_arch, load_options, trust_checkpoint, config, val_fraction)
        own, surrogate_warnings = _match_surrogates(targets, surrogates, trust_checkpoint)
        chosen = classes if isinstance(classes, list) else parse_classes(classes, targets[0].num_classes)
        report = run_audit(
            targets, evaluations, splits, prior=image_prior, config=config, out_dir=out, classes=chosen, runtime=runtime,
            max_attack_acc=max_attack_acc, overwrite=overwrite, progress=progress, provenance=provenance, seeds=seeds,
            allow_weak_evaluator=allow_weak_evaluator, allow_weak_budget=allow_weak_budget, attacks=kinds, surrogates=own,
            extra_warnings=surrogate_warnings,
        )  # fmt: skip
        failing = broadcast(report.gate.failing if report and report.gate else [], runtime)
    finally:
        runtime.close()
    if failing and not runtime.is_main:
        raise PrivacyGateError("the privacy gate failed; rank 0 names the models and writes the report.")
    return report


def _load_inputs(models, data, prior, eval_models, eval_arch, load_options, trust_checkpoint, config, val_fraction=None):
    from mishield.attack.evalmodel import check_hookable
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
    evaluations = [target(e, arch=eval_arch) for e in eval_models]
    for evaluation in evaluations:
        check_hookable(evaluation)
    if prior is None or (isinstance(prior, str) and prior.strip().lower() == "none"):
        image_prior = None
    elif isinstance(prior, Prior):
        image_prior = prior
    else:
        image_prior = load_prior(str(prior), target_input_size=targets[0].preprocessing.input_size,
                                 trust_checkpoint=trust_checkpoint, truncation=config.truncation, center_crop=config.center_crop)
        # A prior file that lists its training images' hashes: refuse private images among them.
        image_prior.description["provenance_check"] = check_prior_overlap(prior, splits)
    return targets, evaluations, splits, image_prior


def _match_surrogates(targets: list[AuditTarget], files, trust_checkpoint: bool) -> tuple[list[list], list[str]]:
    """Each target's surrogates as (module, Preprocessing) pairs, matched by the target SHA-256 each
    file records, and warnings for weak ones; the targets' `info` lists their surrogates for the report."""
    if not files:
        return [[] for _ in targets], []
    from mishield.attack.surrogates import match_surrogates

    found, warnings = match_surrogates([(t.info.get("sha256"), tuple(t.preprocessing.input_size)) for t in targets],
                                       [str(f) for f in files], trust_checkpoint=trust_checkpoint)
    for t, own in zip(targets, found):
        t.info["surrogates"] = [{"source": str(s.source), "arch": s.arch, **{k: s.recipe["surrogate"].get(k) for k in ("agreement", "agreement_n")}}
                                for s in own]  # fmt: skip
    return [[(s.model, s.preprocessing) for s in own] for own in found], warnings
