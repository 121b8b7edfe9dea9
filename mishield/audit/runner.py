"""`audit` and `AuditRun`: attack each model, judge the reconstructions, write one report.

`audit` is the library call behind `mishield audit` (exported as `mishield.audit`): it loads what
it is given (files, specs or `LoadedModel`s, `mishield.audit.loading`), runs an `AuditRun` and
returns the typed `AuditReport` (`mishield.audit.results`) whose `to_dict()` is report.json. Under
`torchrun` every rank runs this with its own shard of the classes and rank 0 writes the report
(docs/architecture.md §3; the protocol and its concepts: §4).
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from mishield import __version__
from mishield.attack.attacks import (
    AttackKind,
    default_attacks,
    make_attack,
    parse_attacks,
)
from mishield.attack.config import AttackConfig
from mishield.attack.engine import (
    Surrogate,
    out_of_memory_hint,
    to_uint8,
)
from mishield.attack.priors import PixelPrior, Prior
from mishield.audit.config import AuditConfig, from_keywords
from mishield.audit.distributed import gather, shard_classes
from mishield.audit.evaluator import Evaluator, check_compatible
from mishield.audit.feature_spaces import (
    EVALUATOR,
    PublicExtractor,
    feature_spaces,
    judge_parts,
    kept_features,
)
from mishield.audit.judging import Judging, gate, grid_name, judge_row, model_audits
from mishield.audit.loading import NamedModel, parse_classes
from mishield.audit.metrics import knn_distances, topk_hits
from mishield.audit.outcomes import EvaluatorOutcome, ShardOutcome
from mishield.audit.report import SHOW_RECONSTRUCTIONS, real_images, write_report
from mishield.audit.results import AuditReport
from mishield.configs import resolve_config
from mishield.errors import BadInputError, PrivacyGateError, UsageError
from mishield.progress import ProgressCallback
from mishield.runtime import Runtime
from mishield.training import evaluate_accuracy

# The grid of prior samples the report shows, so a reader can judge what the attacker draws with.
PRIOR_SAMPLES = "grids/prior_samples.png"


def _unique_names(targets: list[NamedModel]) -> list[str]:
    names, seen = [], {}
    for t in targets:
        n = seen.get(t.name, 0)
        seen[t.name] = n + 1
        names.append(t.name if n == 0 else f"{t.name} ({n + 1})")
    return names


def _attack_config(config: AttackConfig, kind: AttackKind) -> AttackConfig:
    """The shared budget with this attack's loss."""
    return config if kind.loss == config.loss else replace(config, loss=kind.loss).validate()


@dataclass
class AuditRun:
    """One audit of `targets` (the first is the baseline of every Δ and paired difference).

    `evaluations` judge every reconstruction (different architectures; each row reads the most
    leaky). `data` is `mishield.data.DataSplits` of the private data; `prior=None` is the
    generator-free (BatchNorm-statistics) mode. `surrogates[i]` are target i's surrogate models as
    (module, Preprocessing) pairs, which attacks with `surrogates=True` (lomma) optimise through.
    `runtime` (default CPU) is `mishield.runtime.make_runtime`'s, whose rank and world size shard
    the classes under torchrun. `run()` writes report.json, report.html and grids/ into `out_dir`
    and returns the report on rank 0 (None on the other ranks).
    """

    targets: list[NamedModel]
    evaluations: list[NamedModel]
    data: object
    prior: Prior | None
    config: AuditConfig
    out_dir: Path
    runtime: Runtime = field(default_factory=lambda: Runtime(torch.device("cpu")))
    progress: ProgressCallback | None = None
    surrogates: list[list[Surrogate]] | None = None
    warnings: list[str] = field(default_factory=list)  # from loading (e.g. weak surrogates)
    extractor: PublicExtractor | None = None  # the prior's discriminator: the public feature space

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.surrogates = self.surrogates or [[] for _ in self.targets]
        if self.config.attacks is None:  # the default set, with the surrogate attacks where every model has surrogates
            self.attacks = default_attacks(all(self.surrogates), "pixels" if self.prior is None else self.prior.kind)
        else:
            self.attacks = parse_attacks(list(self.config.attacks))
        if not self.targets:
            raise UsageError("name at least one model to audit.")
        if not self.evaluations:
            raise UsageError("name at least one evaluation model.")
        spec = self.config.classes
        self.classes = list(spec) if isinstance(spec, (list, tuple)) else parse_classes(spec, self.targets[0].num_classes)
        self.seed_list = [self.config.attack.seed + i for i in range(self.config.seeds)]
        self.evaluators: list[Evaluator] = []
        self.prior_record: dict | None = None  # the report's `prior`, from this rank's first attack
        self.spaces: list = []  # mishield.audit.feature_spaces.FeatureSpace, when `config.feature_metrics`

    def image_prior(self, target: NamedModel) -> Prior:
        """The prior the attack optimises through: the given one, or pixels at the target's input size."""
        return self.prior if self.prior is not None else PixelPrior(target.preprocessing.input_size)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """The images the attack makes: the prior's output, or the (first) target's input for the pixel prior."""
        return tuple(self.prior.image_shape) if self.prior is not None else tuple(self.targets[0].preprocessing.input_size)

    def run(self) -> AuditReport | None:
        self._check()
        weak = self._weak_budget()
        self.evaluators = [Evaluator(e.model, e.preprocessing, self.runtime, self.config.attack.batch_size) for e in self.evaluations]
        if self.config.feature_metrics:
            self.spaces = feature_spaces(self.evaluators, [e.name for e in self.evaluations], self.extractor, self.runtime,
                                         self.config.attack.batch_size)  # fmt: skip
        trust, trust_warnings, natural_accs = self._trust()
        parts = self._attack_all()
        if natural_accs is None:
            natural_accs = [self._natural_acc(t) for t in self.targets]
        if not self.runtime.is_main:
            return None
        from mishield.audit.masking_checks import diagnose

        masking = diagnose(self, parts)
        said = [*self._architecture_warnings(), *trust_warnings, *weak, *self._surrogate_warnings(), *self.warnings,
                *_masking_warnings(self.targets, masking, self.attacks)]  # fmt: skip
        return self._report(trust, parts, natural_accs, said, masking)

    # -- checks before any attack ------------------------------------------------------------

    def _check(self) -> None:
        targets, data = self.targets, self.data
        if len(self.surrogates) != len(targets):
            raise UsageError(f"`surrogates` needs one list per audited model ({len(targets)}), got {len(self.surrogates)}.")
        if any(k.surrogates for k in self.attacks):
            missing = [t.name for t, s in zip(targets, self.surrogates) if not s]
            if missing:
                names = " and ".join(k.name for k in self.attacks if k.surrogates)
                raise UsageError(f"the {names} attack{'s' if ' and ' in names else ''} need{'' if ' and ' in names else 's'} surrogates "
                                 f"distilled from each model, and {', '.join(missing)} has none; train them with "
                                 "`mishield surrogate train` and pass them with `surrogates`.")
        if not data.train:
            raise BadInputError("the private data folder holds no training images; `data` must be an ImageFolder of the private classes.")
        for t in targets:
            if t.num_classes != targets[0].num_classes:
                raise BadInputError(f"{t.name} has {t.num_classes} classes but {targets[0].name} has {targets[0].num_classes}; "
                                    "models audited together must share their classes.")
            if data.num_classes != t.num_classes:
                raise BadInputError(f"the private data has {data.num_classes} class folders but {t.name} has {t.num_classes} classes; "
                                    "`data` must hold exactly the classes the model was trained on.")
            for evaluation in self.evaluations:
                check_compatible(evaluation.num_classes, t.num_classes, evaluation.name, t.name)
        present = {y for _, y in data.train}
        missing = [c for c in self.classes if c not in present]
        if missing:
            raise BadInputError(f"the private data has no training images of class {missing[0]} ({data.classes[missing[0]]}); "
                                "add some or leave it out of `classes`.")
        if self.config.max_attack_acc is not None:
            from mishield.audit.trust import check_programs_for_gate

            check_programs_for_gate(targets, self.config.trust_checkpoint)
        if self.runtime.world > len(self.classes):
            raise UsageError(f"torchrun started {self.runtime.world} processes for {len(self.classes)} audited classes; "
                             f"start at most {len(self.classes)}.")

    def _weak_budget(self) -> list[str]:
        """`weak_audit: ...` warnings for a budget below the minimum; refuses such a gate unless allowed."""
        from mishield.audit.budgets import budget_warnings

        config = self.config
        weak = budget_warnings(config.attack, self.image_prior(self.targets[0]), [t.model for t in self.targets])
        if weak and config.max_attack_acc is not None and not config.allow_weak_budget:
            raise UsageError(f"the attack budget is too weak to gate a release ({weak[0]}); raise the budget "
                             "(e.g. --preset default) or pass --allow-weak-budget to gate anyway with the audit flagged weak.")
        return [f"weak_audit: {w}." for w in weak]

    def _trust(self) -> tuple[list, list, list | None]:
        """The trust checks before any attack (`mishield.audit.trust`): each evaluator's record, warnings,
        and, for a gate, every target's natural accuracy (measured early so a chance-level target is refused before the attack)."""
        from mishield.audit import trust

        records, said = [], []
        for evaluation, evaluator in zip(self.evaluations, self.evaluators):
            record, warned = trust.check_evaluator(evaluator, evaluation, self.targets, self.data, self.image_shape,
                                                   allow_weak=self.config.allow_weak_evaluator,
                                                   gate=self.config.max_attack_acc is not None)  # fmt: skip
            records.append(record)
            said += warned
        quality = trust.prior_quality(self.prior, self.evaluators[0], self.data, seed=self.config.attack.seed)
        if quality is not None:  # in the report's `prior` (describe() carries the description)
            self.prior.description["quality"] = quality
            if quality["weak"]:
                said.append(trust.weak_prior_warning(quality))
        if self.config.max_attack_acc is None:
            return records, said, None
        natural_accs = [self._natural_acc(t) for t in self.targets]
        for t, acc in zip(self.targets, natural_accs):
            trust.check_target_for_gate(t.name, acc, len(self.data.val), t.num_classes)
        return records, said, natural_accs

    def _natural_acc(self, target: NamedModel) -> float | None:
        # Every rank takes part: evaluate_accuracy shards the held-out images itself.
        if not self.data.val:
            return None
        return evaluate_accuracy(target.model, self.data.val, target.preprocessing, batch_size=self.config.attack.batch_size,
                                 runtime=self.runtime)  # fmt: skip

    # -- the attacks ---------------------------------------------------------------------------

    def _attack_all(self) -> list[list[list[ShardOutcome]]]:
        """This rank's share of every (target, attack) run, gathered on rank 0 as parts[target][attack][rank]."""
        mine = shard_classes(self.classes, self.runtime)
        # Private images degraded to the attack's resolution, so KNN compares like with like (docs/audit.md "Trust checks").
        # Every class's, not only this shard's: the KNN judge compares a reconstruction with all of them.
        items = list(self.data.train)
        privates = [e.dataset(items, self.progress, image_shape=self.image_shape) for e in self.evaluators]
        for space in self.spaces if self.runtime.is_main else ():
            space.prepare(self.data, self.image_shape, self.progress, train=privates[0] if space.kind == EVALUATOR else None)
        parts = []
        for target, own in zip(self.targets, self.surrogates):
            per_attack = []
            for kind in self.attacks:
                config = _attack_config(self.config.attack, kind)
                runs = [self._attack_once(target, privates, mine, replace(config, seed=seed), kind, own)
                        for seed in self.seed_list]  # fmt: skip
                per_attack.append(gather(ShardOutcome.pooled(runs), self.runtime))
            parts.append(per_attack)
        return parts

    def _attack_once(self, target: NamedModel, privates: list, classes: list[int], config: AttackConfig,
                     kind: AttackKind, surrogates: list[Surrogate]) -> ShardOutcome:  # fmt: skip
        prior = self.image_prior(target)
        candidates: list[list[torch.Tensor]] = [[] for _ in self.evaluators]

        def judge(images: torch.Tensor, labels: torch.Tensor) -> None:
            # Every optimised candidate, judged before final selection drops it: the unfiltered accuracy.
            for seen, evaluator in zip(candidates, self.evaluators):
                seen.append(topk_hits(evaluator.images(images)[0], labels, 1))

        try:
            attack = make_attack(kind, prior, target.model, target.preprocessing, config, self.runtime, surrogates, self.config.blackbox)
            result = attack.run(classes, self.progress, on_candidates=judge)
        except RuntimeError as err:  # torch.OutOfMemoryError is one
            hint = out_of_memory_hint(err, config.batch_size)
            if hint is None:
                raise
            raise hint from None
        n, k = len(classes), config.keep
        labels = torch.tensor(classes).repeat_interleave(k)
        outcomes, first_features = [], None
        for evaluator, private, seen in zip(self.evaluators, privates, candidates):
            logits, features = evaluator.images(result.images.flatten(0, 1))
            first_features = features if first_features is None else first_features
            so_top1, so_top5 = _selection_only(result.selection_only, evaluator, classes)
            outcomes.append(EvaluatorOutcome(
                top1=topk_hits(logits, labels, 1).view(n, k), top5=topk_hits(logits, labels, 5).view(n, k),
                knn=knn_distances(features, labels, *private).view(n, k),
                unfiltered=torch.cat(seen).view(n, -1) if seen else None, so_top1=so_top1, so_top5=so_top5,
            ))  # fmt: skip
        if self.prior_record is None:
            self.prior_record = {**prior.describe(), "lr": config.resolve(prior).lr, "budget": config.resolve(prior).to_dict()}
        return ShardOutcome(classes=classes, target_conf=result.final_scores, evaluators=outcomes,
                            shown=result.images[:, :SHOW_RECONSTRUCTIONS].clone(), image_steps=result.image_steps,
                            seconds=result.seconds, timings=result.timings, target_top1=result.final_top1,
                            loss_curve=list(result.loss_curve), queries=getattr(result, "queries", None),
                            features=kept_features(self.spaces, result.images, first_features))  # fmt: skip

    # -- the report (rank 0) ---------------------------------------------------------------------

    def _budget(self, kind: AttackKind) -> dict:
        """What one attack ran with: the shared budget with its loss, the seeds, and for the black-box
        attack its search and its cost in target queries per candidate."""
        resolved = _attack_config(self.config.attack, kind).resolve(self.image_prior(self.targets[0]))
        budget = {**self.config.attack.to_dict(), **resolved.to_dict(), "seeds": self.seed_list}
        if kind.engine == "blackbox":
            search = replace(self.config.blackbox, mode=kind.mode).resolve(resolved)
            budget |= {"blackbox": search.to_dict(), "queries_per_candidate": search.queries_per_candidate}
        return budget

    def _report(self, trust: list, parts: list, natural_accs: list, said: list[str], masking: list[dict]) -> AuditReport:
        """Judge every (model, attack) row and write the report files."""
        config, data, classes = self.config, self.data, self.classes
        judging = Judging(config.max_attack_acc, {kind.name: self._budget(kind) for kind in self.attacks},
                          [{"name": e.name, "accuracy": (t or {}).get("accuracy")} for e, t in zip(self.evaluations, trust)],
                          {kind.name: kind.to_dict() for kind in self.attacks})  # fmt: skip
        names = _unique_names(self.targets)
        rows = [[judge_row(kind.name, p, classes, data.classes, t.num_classes, (acc, len(data.val)), judging,
                           grid_name(mi, names[mi], kind.name, len(self.attacks)))
                 for kind, p in zip(self.attacks, parts[mi])]
                for mi, t, acc in zip(range(len(self.targets)), self.targets, natural_accs)]  # fmt: skip
        judge_parts(rows, parts, classes, self.spaces)  # the KNN judge and distribution figures, in place
        models = model_audits(self.targets, names, rows, masking)
        shown = {r.grid: r.shown for model_rows in rows for r in model_rows}
        real = {c: real_images(data.train, c, tuple(next(iter(shown.values()))[c].shape[1:])) for c in classes}
        eval_records = [{"name": e.name, **e.info, "preprocessing": e.preprocessing.to_dict(), "features": ev.feature_source, "trust": t}
                        for e, ev, t in zip(self.evaluations, self.evaluators, trust)]  # fmt: skip
        runtime = self.runtime
        report = AuditReport(
            models=models, classes=classes, seed=config.attack.seed, prior=self.prior_record,
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), mishield_version=__version__,
            options={**config.attack.to_dict(), "attacks": [k.name for k in self.attacks], "blackbox": config.blackbox.to_dict(),
                     "device": str(runtime.device),
                     "bf16": runtime.amp_dtype is not None, "channels_last": runtime.channels_last, "world_size": runtime.world,
                     "max_attack_acc": config.max_attack_acc, "seeds": self.seed_list, **(config.provenance or {})},
            data={"classes": data.classes, "train_images": len(data.train), "val_images": len(data.val),
                  **({"held_out": data.held_out} if getattr(data, "held_out", None) else {})},
            eval_model=eval_records[0], eval_models=eval_records,
            gate=None if config.max_attack_acc is None else gate(models, config.max_attack_acc),
            warnings=said,
            prior_samples=None if self.prior is None or self.prior.kind == "pixels" else PRIOR_SAMPLES,
            feature_extractors=[space.record() for space in self.spaces],
        )  # fmt: skip
        samples = None if report.prior_samples is None else _prior_samples(self.prior, config.attack.seed, runtime.device)
        report.files = {k: str(v) for k, v in write_report(self.out_dir, report, shown, real, config.overwrite, samples).items()}
        return report

    def _architecture_warnings(self) -> list[str]:
        return [
            f"the evaluation model {e.name} shares the architecture of {t.name} ({t.info['arch']}); the protocol asks for a different one."
            for e in self.evaluations
            for t in self.targets
            if t.info.get("arch") and t.info.get("arch") == e.info.get("arch")
        ]

    def _surrogate_warnings(self) -> list[str]:
        if any(k.surrogates for k in self.attacks):
            return []
        return [f"surrogates of {t.name} were given but no chosen attack uses them (add lomma or transfer to `attacks`)."
                for t, s in zip(self.targets, self.surrogates) if s]  # fmt: skip


def _masking_warnings(targets: list[NamedModel], masking: list[dict], attacks: list[AttackKind]) -> list[str]:
    """`masking:` warnings: each model whose diagnostics found a signal, and what may still decide its verdict."""
    from mishield.audit.masking_checks import cannot_decide

    said = []
    for target, entry in zip(targets, masking):
        if not entry["signals"]:
            continue
        left = [k.name for k in attacks if cannot_decide(k, entry) is None]
        then = (f"only {', '.join(left)} can decide its verdict" if left else
                "no attack that ran can decide its verdict (run blackbox, or transfer with --surrogate)")
        said.append(f"masking: {target.name}: {' '.join(s['reason'] for s in entry['signals'])} So {then}.")
    return said


def _selection_only(result, evaluator: Evaluator, classes: list[int]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The evaluator's top-1 / top-5 hits on the selection-only (I = 0) baseline, where the engine made one."""
    if result is None:
        return None, None
    n, k = result.images.shape[:2]
    labels = torch.tensor(classes).repeat_interleave(k)
    logits, _ = evaluator.images(result.images.flatten(0, 1))
    return topk_hits(logits, labels, 1).view(n, k), topk_hits(logits, labels, 5).view(n, k)


@torch.no_grad()
def _prior_samples(prior: Prior, seed: int, device: torch.device, n: int = 16) -> torch.Tensor:
    latents = prior.sample(n, torch.Generator().manual_seed(seed + 7919), device)
    return to_uint8(prior.generate(latents)).cpu()


def audit(models, *, data, prior, eval_model, config: AuditConfig | None = None, surrogates=None,
          out: str | Path = "mishield-audit", progress: ProgressCallback | None = None, **keywords) -> AuditReport | None:  # fmt: skip
    """Audit `models` (files, architecture specs or `LoadedModel`s; the first is the Δ baseline).

    `data`: the private ImageFolder (a path, or `mishield.data.DataSplits`); `prior`: a prior
    file or `package.module:factory`, a `Prior`, or None / "none" for the generator-free mode;
    `eval_model`: the evaluation model, or a list of several (different architectures; each row
    reads the most leaky) — paths, specs or `LoadedModel`s. `config` (`AuditConfig`, default
    `AuditConfig.preset("default")`) holds the budget, the attacks, the gate and the options.
    `surrogates`: surrogate model files (`mishield surrogate train`), each matched to the audited
    model it was distilled from by that model's SHA-256; the lomma attack needs one per model.
    Natural accuracy is measured on `data`'s val/ folder, else on a seeded `val_fraction` of it.
    Writes the report into `out` and returns it. Under torchrun, ranks other than 0 return None,
    or raise `PrivacyGateError` when the gate failed, so every process ends alike. The trust
    checks (docs/audit.md "Trust checks") refuse an untrustworthy evaluator, a chance-level target
    under a gate and private images found among a prior file's training images.

    The former keyword form (`preset=`, `attack={...}`, `max_attack_acc=`, ...) still works for one
    release, with a DeprecationWarning.
    """
    from mishield.audit.distributed import broadcast
    from mishield.audit.loading import load_inputs, match_model_surrogates
    from mishield.audit.report import check_outputs
    from mishield.fileio import output_lock
    from mishield.runtime import make_runtime

    config = resolve_config("audit", config, keywords, AuditConfig, from_keywords)
    # Refused before any loading: an existing report, or an output inside or over an input.
    named = [m for m in (models if isinstance(models, (list, tuple)) else [models]) if isinstance(m, (str, Path))]
    evals = list(eval_model) if isinstance(eval_model, (list, tuple)) else [eval_model]
    inputs = [x for x in (*named, *evals, *(surrogates or ()), prior, data) if isinstance(x, (str, Path))]
    check_outputs(Path(out), config.overwrite, inputs=inputs)
    runtime = make_runtime(config.device)
    try:
        with output_lock(Path(out)):  # a second audit into the same folder stops here (exit 2)
            loaded = load_inputs(models, data, prior, evals, config)
            own, surrogate_warnings = match_model_surrogates(loaded.targets, surrogates, config.trust_checkpoint)
            report = AuditRun(loaded.targets, loaded.evaluations, loaded.data, loaded.prior, config, Path(out), runtime,
                              progress, own, surrogate_warnings, extractor=loaded.extractor).run()  # fmt: skip
        failing = broadcast(report.gate.failing if report and report.gate else [], runtime)
    finally:
        runtime.close()
    if failing and not runtime.is_main:
        raise PrivacyGateError("the privacy gate failed; rank 0 names the models and writes the report.")
    return report
