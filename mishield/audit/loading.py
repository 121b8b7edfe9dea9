"""What an audit reads: the audited models, the evaluation models, the private data, the prior and
the surrogates, each loaded once and checked before any attack (docs/architecture.md §3).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from mishield.attack.priors import Prior
from mishield.errors import BadInputError, UsageError
from mishield.preprocessing import Preprocessing

DEFENCE_KEYS = ("bido", "label_smoothing", "erase", "freeze_stages", "public_pretraining")


@dataclass
class NamedModel:
    """A classifier the audit uses, an audited target or an evaluation model: its name in the report,
    the module and its input contract, and what its file records."""

    name: str
    model: nn.Module
    preprocessing: Preprocessing
    num_classes: int
    info: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)  # what its file records: classes, training, metrics (trust checks)

    @classmethod
    def from_loaded(cls, loaded, name: str | None = None) -> NamedModel:
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
        training = recipe.get("training") or {}
        # the loss / data defences its training stacked on the surgery (mishield.hardening), by their recorded settings
        info["defences"] = {k: training[k] for k in DEFENCE_KEYS if training.get(k)} if training else None
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


@dataclass
class AuditInputs:
    """The loaded inputs of one audit."""

    targets: list[NamedModel]
    evaluations: list[NamedModel]
    data: object  # mishield.data.DataSplits of the private data
    prior: Prior | None  # None: the generator-free (pixel) mode
    extractor: object | None = None  # mishield.audit.feature_spaces.PublicExtractor: the prior file's discriminator


def load_inputs(models, data, prior, eval_models: list, config) -> AuditInputs:
    """Load the audited `models`, the `eval_models`, the private `data` and the `prior` under the
    options of `config` (`mishield.audit.config.AuditConfig`): files, specs or loaded objects."""
    from mishield.attack.priors import load_prior
    from mishield.audit.evaluator import check_hookable
    from mishield.audit.trust import check_prior_overlap
    from mishield.data import (
        DataSplits,
        fit_resolution,
        has_validation,
        hold_out,
        load_image_folders,
    )
    from mishield.models import LoadedModel, load_model

    attack, load_options = config.attack, config.load_options or {}
    # A folder without val/ is scanned whole first: where to split it may be the evaluator's to say.
    splits = data if isinstance(data, DataSplits) else load_image_folders(data, val_fraction=config.val_fraction,
                                                                         seed=attack.seed)
    size_given = load_options.get("input_size") is not None

    def named(m, **options) -> NamedModel:
        if isinstance(m, LoadedModel):
            return NamedModel.from_loaded(m)
        loaded = load_model(str(m), trust_checkpoint=config.trust_checkpoint, **options)
        # a plain state dict does not say its resolution: the private data does (as in harden)
        return NamedModel.from_loaded(fit_resolution(loaded, splits.train, size_given))

    if isinstance(models, (str, Path)) or not isinstance(models, (list, tuple)):
        models = [models]
    if not models:
        raise UsageError("name at least one model to audit.")
    targets = [named(m, **load_options) for m in models]
    evaluations = [named(e, arch=config.eval_arch) for e in eval_models]
    for evaluation in evaluations:
        check_hookable(evaluation)
    if not isinstance(data, DataSplits) and not has_validation(data) and config.val_fraction is None:
        fraction, seed, source = shared_split(data, splits, evaluations, attack.seed)
        splits = hold_out(splits, fraction, seed)
        splits.held_out["from"] = source
    if prior is None or (isinstance(prior, str) and prior.strip().lower() == "none"):
        image_prior = None
    elif isinstance(prior, Prior):
        image_prior = prior
    else:
        image_prior = load_prior(str(prior), target_input_size=targets[0].preprocessing.input_size,
                                 trust_checkpoint=config.trust_checkpoint, truncation=attack.truncation,
                                 center_crop=attack.center_crop)
        # A prior file that lists its training images' hashes: refuse private images among them.
        image_prior.description["provenance_check"] = check_prior_overlap(prior, splits)
    extractor = None
    if image_prior is not None and config.feature_metrics:
        from mishield.audit.feature_spaces import public_extractor

        extractor = public_extractor(prior)
    return AuditInputs(targets, evaluations, splits, image_prior, extractor)


def shared_split(data, scanned, evaluations: list[NamedModel], seed: int) -> tuple[float, int, str]:
    """(fraction, seed, whose) of the hold-out of a private folder without val/: the one the
    evaluation model recorded when it was trained on this folder (`mishield train-eval`,
    `training.split`), so the audit measures it on exactly the images it did not see and judges with
    it on the images it learnt; else the default share with the audit's seed (`resolve_val_fraction`)."""
    from mishield.data import resolve_val_fraction
    from mishield.training.state import data_signature

    signature = data_signature(sorted(scanned.train))
    for evaluation in evaluations:
        split = (evaluation.provenance.get("training") or {}).get("split") or {}
        if "val_fraction" in split and split.get("signature") == signature:
            return float(split["val_fraction"]), int(split["seed"]), f"the evaluation model {evaluation.name}"
    return resolve_val_fraction(data), seed, "the audit's seed"


def match_model_surrogates(targets: list[NamedModel], files, trust_checkpoint: bool) -> tuple[list[list], list[str]]:
    """Each target's surrogates as (module, Preprocessing) pairs, matched by the target SHA-256 each
    file records, and warnings for weak ones; the targets' `info` lists their surrogates for the report."""
    if not files:
        return [[] for _ in targets], []
    from mishield.audit.surrogates import match_surrogates

    found, warnings = match_surrogates([(t.info.get("sha256"), tuple(t.preprocessing.input_size)) for t in targets],
                                       [str(f) for f in files], trust_checkpoint=trust_checkpoint)
    for t, own in zip(targets, found):
        t.info["surrogates"] = [{"source": str(s.source), "arch": s.arch, **{k: s.recipe["surrogate"].get(k) for k in ("agreement", "agreement_n")}}
                                for s in own]  # fmt: skip
    return [[(s.model, s.preprocessing) for s in own] for own in found], warnings
