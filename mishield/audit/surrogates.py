"""Surrogate files in an audit: each one matched to the audited model it was distilled from.

The adaptive (LOMMA) attack optimises through surrogates distilled from each audited model
(`mishield.training.distillation.train_surrogate`, `mishield surrogate train`). A surrogate file
records the SHA-256 of its target's file; the audit uses it to give every model its own surrogates
and refuses a file that is not a surrogate, one of another model, or one at another resolution
(docs/audit.md, "Surrogate models").
"""

from __future__ import annotations

from mishield.errors import BadInputError
from mishield.training.distillation import weak_agreement_warning


def _read_surrogate(path, trust_checkpoint: bool):
    """A surrogate file as a LoadedModel and its `surrogate` record; refuses a file that is not one."""
    from mishield.models import load_model

    loaded = load_model(str(path), trust_checkpoint=trust_checkpoint)
    record = (loaded.recipe or {}).get("surrogate") if loaded.kind == "mishield" else None
    if not isinstance(record, dict) or not record.get("target_sha256"):
        raise BadInputError(f"{path} is not a surrogate model (it records no target); make one with mishield surrogate train.")
    return loaded, record


def _check_input_size(path, loaded, input_size) -> None:
    if input_size is not None and tuple(loaded.preprocessing.input_size) != tuple(input_size):
        raise BadInputError(
            f"{path} takes {list(loaded.preprocessing.input_size)} inputs but the target is attacked at "
            f"{list(input_size)}; distil the surrogate at the target's resolution (--input-size)."
        )


def load_surrogates(paths, target_sha256: str, *, input_size: tuple[int, ...] | None = None,
                    trust_checkpoint: bool = False) -> tuple[list, list[str]]:
    """The surrogate files in `paths` as LoadedModels, and warnings for weak ones.

    Refuses (BadInputError, exit 3) a file that is not a surrogate (no `surrogate` record), one
    distilled from another model than the one whose file hashes to `target_sha256`, and, given
    the target's `input_size` (C, H, W), one trained at another input size. A surrogate whose
    recorded agreement is below `MIN_AGREEMENT` is loaded but named in the warnings.
    """
    models, warnings = [], []
    for path in paths:
        loaded, record = _read_surrogate(path, trust_checkpoint)
        if record["target_sha256"] != target_sha256:
            raise BadInputError(
                f"{path} was distilled from {record.get('target_name')} (sha256 {record['target_sha256'][:12]}), "
                f"not from the audited target (sha256 {str(target_sha256)[:12]}); distil a surrogate from this target."
            )
        _check_input_size(path, loaded, input_size)
        warnings += [w for w in [weak_agreement_warning(path, float(record.get("agreement", 0.0)), int(record.get("agreement_n", 0)))] if w]
        models.append(loaded)
    return models, warnings


def match_surrogates(targets: list[tuple[str | None, tuple[int, ...]]], paths, *, trust_checkpoint: bool = False
                     ) -> tuple[list[list], list[str]]:  # fmt: skip
    """Sort surrogate files to the targets they were distilled from, by the SHA-256 each file records.

    `targets` are (sha256 of the target's file, its input size) pairs. Returns per target its
    surrogates as LoadedModels, and warnings for weak ones. Refuses (exit 3) a file that is not a
    surrogate, one distilled from none of the targets, and one at another input size than its target.
    """
    found: list[list] = [[] for _ in targets]
    warnings: list[str] = []
    for path in paths:
        loaded, record = _read_surrogate(path, trust_checkpoint)
        index = next((i for i, (sha, _) in enumerate(targets) if sha and sha == record["target_sha256"]), None)
        if index is None:
            raise BadInputError(f"{path} was distilled from {record.get('target_name')} (sha256 {record['target_sha256'][:12]}), "
                                "which is none of the audited models; pass the surrogates of the models you audit.")
        _check_input_size(path, loaded, targets[index][1])
        warnings += [w for w in [weak_agreement_warning(path, float(record.get("agreement", 0.0)), int(record.get("agreement_n", 0)))] if w]
        found[index].append(loaded)
    return found, warnings
