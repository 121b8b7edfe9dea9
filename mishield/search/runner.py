"""`search_defences`: find the least leaky stack of defences within a natural-accuracy budget.

    result = mishield.search_defences("model.pt", data="private/", public="public/", out="hardened.pt",
                                      config=SearchConfig(base=HardenConfig(epochs=20), max_acc_drop=0.02))

1. The audit's parts: `prior` (a file, or "none" for the generator-free prior), else a DCGAN
   trained on `public`; `eval_model` (files), else one trained on `data` (`train_eval_model`).
2. Every candidate of the grid (`mishield.search.grid`) is hardened from the original with a short
   fine-tuning (`search_epochs`) through `mishield.harden`, on the same split of `data`.
3. ONE `mishield.audit` call attacks the original first and then every candidate: the same pool,
   crops and judge for all, so each candidate's paired difference to the original is exact.
4. The selection rule (`mishield.search.selection`) keeps the candidates within `max_acc_drop`
   and picks the lowest upper end of worst-case attack accuracy; the pick is then fine-tuned for
   the full `base.epochs` into `out`, and (`remeasure`) audited again against the original.
5. OUT.search.json (every candidate's figures, the pick and why, plain statements of a null
   result) and OUT.search.svg (the privacy/utility front) are written last.

Resumable: every step's output is its mark of completion (`mishield.search.state`); a rerun with
the same inputs and options continues, and Ctrl-C (exit 130) or SIGTERM (exit 143) leave it so.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from mishield.errors import BadInputError, UsageError, first_line
from mishield.fileio import output_lock
from mishield.progress import ProgressCallback
from mishield.search.config import SearchConfig
from mishield.search.grid import Candidate
from mishield.search.results import SearchResult
from mishield.search.selection import (
    SELECTION_RULE,
    final_statements,
    judge,
    pick,
    statements,
)
from mishield.search.state import SearchPaths, SearchState

SearchLog = Callable[[str], None]
# Keys of a model file's training record that describe the run rather than its recipe.
_RUN_KEYS = ("final", "classes", "train_images", "val_images", "bido_features", "seconds", "epochs_run")


@dataclass
class _Run:
    """One search in progress: its inputs, configuration, files and reporting."""

    model: object  # path, spec or LoadedModel of the original
    data: Path
    config: SearchConfig
    paths: SearchPaths
    splits: object  # mishield.data.DataSplits, the split every model is trained and measured on
    progress: ProgressCallback | None
    log: SearchLog | None

    def say(self, line: str) -> None:
        if self.log is not None:
            self.log(line)

    def on_epoch(self):
        if self.log is None:
            return None
        from mishield.progress import format_epoch

        return lambda record: self.log("  " + format_epoch(record))

    def fresh_model(self):
        """The original for one more `harden` call: a copy when given loaded (TTS trains in place)."""
        return copy.deepcopy(self.model) if not isinstance(self.model, (str, Path)) else self.model


def search_defences(
    model,
    *,
    data: str | Path,
    public: str | Path | None = None,
    prior: str | Path | None = None,
    eval_model: str | Path | list | None = None,
    out: str | Path,
    config: SearchConfig | None = None,
    progress: ProgressCallback | None = None,
    log: SearchLog | None = None,
) -> SearchResult:
    """Search the grid of `config` (`SearchConfig`) on `model`, a trained checkpoint (a file or a
    `LoadedModel`; loaded with `config.load_options`), and write the pick to `out`.

    `data`: the private ImageFolder (its val/ folder, or a seeded `base.val_fraction` of it, measures
    natural accuracy for every model). `public`: the attacker's public ImageFolder the audit's
    prior is trained on when `prior` is not given. `prior`: a prior file, or "none" for the
    generator-free prior. `eval_model`: the evaluation model file(s); trained on `data` when not
    given. `progress(description, done, total)` reports the candidates ("search") and every
    training step and attack; `log(line)` receives one line per step and per epoch. Returns the
    `SearchResult` whose `to_dict()` is OUT.search.json; `result.out` is None when no candidate
    was within the budget (then no model is written).
    """
    config = config or SearchConfig()
    t0 = time.perf_counter()
    paths = SearchPaths(Path(out))
    inputs = [x for x in (model, data, public, prior, *_as_list(eval_model)) if isinstance(x, (str, Path))]
    _check_call(model, data, public, prior, paths, config, inputs)
    with output_lock(paths.out):  # a second search (or harden) into the same `out` stops here (exit 2)
        original = _load_original(model, config)
        splits, config = _splits(Path(data), config)
        state = SearchState(paths, _fingerprint(original, model, splits, public, prior, eval_model, config))
        _check_outputs(paths, state.read(config.overwrite), config.overwrite, inputs)
        with _resumable(paths):
            state.start(config.overwrite)
            run = _Run(model, Path(data), config, paths, splits, progress, log)
            prior_file = _prior(run, prior, public)
            evaluators = _eval_models(run, eval_model, prior_file)
            trained = _train_candidates(run)
            report = _audit(run, [model, *[c["file"] for c in trained]], prior_file, evaluators, paths.audit, "candidates")
            result = _select(run, report, trained)
            if result.pick is not None:
                _finish(run, state, result, prior_file, evaluators)
        result.seconds, result.resumed = time.perf_counter() - t0, state.resumed
        _write_documents(paths, result, config.overwrite)
    return result


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def _check_call(model, data, public, prior, paths: SearchPaths, config: SearchConfig, inputs: list) -> None:
    from mishield.fileio import check_side_file, check_writable_dir
    from mishield.hardening import side_files_for

    if data is None:
        raise UsageError("the search fine-tunes and audits on your private images; pass `data`.")
    if prior is None and public is None:
        raise UsageError("the search's audit needs an image prior: pass `prior` (a prior file, or none for the "
                         "generator-free prior) or `public` (public images to train one on).")
    check_writable_dir(paths.work, inputs)
    for side in (paths.work, *side_files_for(paths.out)):  # the work folder is deleted with `overwrite`
        check_side_file(side, inputs)


def _check_outputs(paths: SearchPaths, state: SearchState, overwrite: bool, inputs: list) -> None:
    """Refuse outputs that exist (or are inputs) before any work; the pick this same search already
    wrote (its SHA-256 recorded) is the one exception, so a search stopped after it continues."""
    from mishield.fileio import check_writable, sha256_file
    from mishield.hardening import public_state_path_for, state_path_for

    ours = state.notes.get("final_sha256")
    for path in (paths.out, paths.json, paths.svg):
        if path == paths.out and ours and path.is_file() and sha256_file(path) == ours:
            continue
        check_writable(path, overwrite, inputs=inputs)
    if overwrite:  # a new search: an earlier one's interrupted full fine-tuning is not continued
        for stale in (state_path_for(paths.out), public_state_path_for(paths.out)):
            stale.unlink(missing_ok=True)


def _load_original(model, config: SearchConfig):
    from mishield.models import LoadedModel, load_model

    loaded = model if isinstance(model, LoadedModel) else load_model(str(model), **(config.load_options or {}))
    if loaded.kind == "spec":
        raise UsageError(f"the search compares hardened copies with your trained model, but {model} is an untrained "
                         "architecture spec; pass the trained checkpoint.")
    if not loaded.supports_surgery:
        raise BadInputError(f"{loaded.source or model} is a {loaded.kind} archive, which cannot be rewritten; search on "
                            "the original checkpoint.")
    return loaded


def _splits(data: Path, config: SearchConfig):
    """The private split every candidate trains on and every audit measures with, and the config
    whose `base.val_fraction` makes `harden` draw exactly that split."""
    from mishield.data import load_image_folders, resolve_val_fraction

    fraction = resolve_val_fraction(data, None, config.base.val_fraction)
    splits = load_image_folders(data, val_fraction=fraction, seed=config.base.seed)
    if not splits.val:
        raise BadInputError(f"{data} gives no held-out images, so natural accuracy cannot be compared; add a val/ folder "
                            "or pass `val_fraction`.")
    return splits, config.replace(base=config.base.replace(val_fraction=fraction))


def _fingerprint(original, model, splits, public, prior, eval_model, config: SearchConfig) -> dict:
    """What a rerun must share with the run it continues (the selection's own fields excluded:
    `max_acc_drop` and `remeasure` only re-read what was measured)."""
    from mishield.fileio import sha256_file
    from mishield.training.state import data_signature

    def identity(x):
        if isinstance(x, (str, Path)) and Path(x).is_file():
            return {"path": str(Path(x).resolve()), "sha256": sha256_file(x)}
        return None if x is None else str(x)

    options = config.to_dict()
    for key in ("max_acc_drop", "remeasure"):
        options.pop(key)
    for key in ("device", "workers", "compile", "force"):  # where it runs (or whether it may), not what it computes
        options["base"].pop(key)
    return {"model": original.source_sha256 or identity(model), "train": data_signature(splits.train),
            "val": data_signature(splits.val), "public": None if public is None else str(Path(public).resolve()),
            "prior": identity(prior), "eval_models": [identity(e) for e in _as_list(eval_model)], "options": options}


@contextlib.contextmanager
def _resumable(paths: SearchPaths) -> Iterator[None]:
    """Ctrl-C and SIGTERM anywhere in the search (a trainer, the audit) stop it with exit 130 / 143
    and a sentence on how to continue; what finished stays in the work folder."""
    from mishield.training.interrupt import (
        Preempted,
        TrainingInterrupted,
        TrainingPreempted,
        preemptible,
    )

    advice = (f"rerun the same command to continue; the finished steps are kept in {paths.work} and an "
              "interrupted training continues from its last epoch")
    try:
        with preemptible():
            yield
    except TrainingInterrupted as err:
        raise type(err)(f"the search stopped ({first_line(err).split(';')[0]}); {advice}.") from None
    except KeyboardInterrupt as err:
        if isinstance(err, Preempted):
            raise TrainingPreempted(f"the search was stopped by SIGTERM; {advice}.") from None
        raise TrainingInterrupted(f"the search was interrupted; {advice}.") from None


def _prior(run: _Run, prior, public) -> str | Path | None:
    """The given prior, or the DCGAN trained on `public` (once: its file marks it done)."""
    if prior is not None:
        return prior
    from mishield.training import state_path_for
    from mishield.training.prior import PriorTrainingConfig, train_prior

    file = run.paths.prior
    if not file.exists():
        run.say(f"training the audit's image prior on {public}")
        train_prior(public, file, run.config.prior_training or PriorTrainingConfig(seed=run.config.base.seed),
                    device=run.config.base.device, resume=state_path_for(file).exists(), progress=run.progress,
                    on_epoch=run.on_epoch())
    return file


def _eval_models(run: _Run, given, prior) -> list:
    """The given evaluation model(s), or one trained on the private training images (once)."""
    if given is not None:
        return _as_list(given)
    from mishield.training import state_path_for
    from mishield.training.evaluator import EvalModelConfig, train_eval_model

    file = run.paths.eval_model
    if not file.exists():
        run.say(f"training the evaluation model on {run.data}")
        base = run.config.base
        config = run.config.eval_training or EvalModelConfig(device=base.device, seed=base.seed + 1, workers=base.workers)
        config = replace(config, resume=state_path_for(file).exists(), overwrite=False,
                         val_fraction=config.val_fraction if config.val_fraction is not None else base.val_fraction)
        prior_file = prior if isinstance(prior, (str, Path)) and Path(prior).is_file() else None
        train_eval_model(run.data, file, config=config, prior=prior_file, progress=run.progress, on_epoch=run.on_epoch())
    return [file]


def _train_candidates(run: _Run) -> list[dict]:
    """Each candidate hardened from the original with the short fine-tuning (skipped once its file exists)."""
    from mishield.hardening import harden
    from mishield.training import state_path_for

    candidates, trained = run.config.candidates, []
    for index, candidate in enumerate(candidates):
        file = run.paths.candidate(index, candidate.name)
        if run.progress is not None:
            run.progress("search", index, len(candidates))
        if file.exists():
            run.say(f"candidate {index + 1}/{len(candidates)} {candidate.name}: done earlier ({file.name})")
        else:
            run.say(f"candidate {index + 1}/{len(candidates)} {candidate.name}: {run.config.search_epochs} epoch(s)")
            config = run.config.candidate_config(candidate, run.config.search_epochs, state_path_for(file).exists())
            harden(run.fresh_model(), config=config, data=run.data, out=file, progress=run.progress,
                   on_epoch=run.on_epoch(), load_options=run.config.load_options)
        trained.append(_candidate_record(candidate, file, run.config))
    if run.progress is not None:
        run.progress("search", len(candidates), len(candidates))
    return trained


def _load_output(file: Path, config: SearchConfig):
    """A model file this search wrote, loaded as the original was (its architecture confirmed the same way)."""
    from mishield.models import load_model

    given = config.load_options or {}
    return load_model(file, **({"arch": given["arch"]} if given.get("arch") else {}),
                      trust_checkpoint=bool(given.get("trust_checkpoint")))


def _candidate_record(candidate: Candidate, file: Path, config: SearchConfig) -> dict:
    training = (_load_output(file, config).recipe or {}).get("training") or {}
    recipe = {k: v for k, v in training.items() if k not in _RUN_KEYS}
    return {"candidate": candidate, "file": file, "recipe": {**candidate.to_dict(), "training": recipe},
            "train_seconds": training.get("seconds")}


def _audit(run: _Run, models: list, prior, evaluators: list, folder: Path, what: str) -> dict:
    """One `mishield.audit` of `models` (the original first) into `folder`; its report.json marks it done."""
    import json

    import mishield

    report_file = folder / "report.json"
    if report_file.is_file():
        run.say(f"audit of the {what}: done earlier ({folder})")
        return json.loads(report_file.read_text())
    run.say(f"auditing the original and the {what} ({len(models)} models, one audit: same pool and crops)")
    config = run.config.audit_config()
    if evaluators == [run.paths.eval_model] and config.eval_arch is None and run.config.eval_training is not None:
        config = config.replace(eval_arch=run.config.eval_training.arch)  # the architecture this search trained it with
    loaded = [m if i == 0 else _load_output(Path(m), run.config) for i, m in enumerate(models)]
    report = mishield.audit(loaded, data=run.splits, prior=prior, eval_model=evaluators, config=config, out=folder,
                            progress=run.progress)
    return report.to_dict()


def _select(run: _Run, report: dict, trained: list[dict]) -> SearchResult:
    """The selection rule on the candidates' audit, as a SearchResult without the final model yet."""
    from mishield import __version__

    config = run.config
    base, rows = judge(report, [t["candidate"].name for t in trained], config.max_acc_drop)
    for row, t in zip(rows, trained):
        row.update(recipe=t["recipe"], file=str(t["file"]), train_seconds=t["train_seconds"])
    chosen = pick(rows)
    base = {"name": report["models"][0]["name"], **base}
    return SearchResult(
        model=str(getattr(run.model, "source", None) or run.model), out=None,
        files={"json": str(run.paths.json), "svg": str(run.paths.svg), "work": str(run.paths.work),
               "audit_report": str(run.paths.audit / "report.json")},
        options=config.to_dict(), baseline=base, candidates=rows, pick=None if chosen is None else chosen["name"],
        statements=statements(base, rows, chosen, config.max_acc_drop), selection_rule=SELECTION_RULE,
        warnings=list(report.get("warnings") or []), mishield_version=__version__,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )


def _finish(run: _Run, state: SearchState, result: SearchResult, prior, evaluators: list) -> None:
    """Fine-tune the pick fully into `out` (resumable), then re-measure it against the original."""
    from mishield.fileio import sha256_file
    from mishield.hardening import harden
    from mishield.training import state_path_for

    config, out = run.config, run.paths.out
    chosen = result.picked
    candidate = next(c for c in config.candidates if c.name == chosen["name"])
    if state.notes.get("final_sha256") is None or not out.is_file():
        run.say(f"the pick {candidate.name}: full fine-tuning, {config.full_epochs} epoch(s) -> {out}")
        resume = state_path_for(out).exists()
        harden(run.fresh_model(), config=config.candidate_config(candidate, config.full_epochs, resume), data=run.data, out=out, progress=run.progress,
               on_epoch=run.on_epoch(), load_options=config.load_options)
        state.note("final_sha256", sha256_file(out))
    result.out = out
    if not config.remeasure:
        result.statements.append("The fully fine-tuned pick was not audited again (`remeasure` off): its privacy figures "
                                 "are the short-budget candidate's.")
        return
    report = _audit(run, [run.model, out], prior, evaluators, run.paths.final_audit, "fully fine-tuned pick")
    base, (row,) = judge(report, [candidate.name], config.max_acc_drop)
    result.final = {"name": candidate.name, "file": str(out), "epochs": config.full_epochs, **row,
                    "original_natural_acc": base["natural_acc"], "original_attack_acc1": base["attack_acc1"]}
    result.files["final_audit_report"] = str(run.paths.final_audit / "report.json")
    result.statements += final_statements(result.final, base, candidate.name, config.max_acc_drop, config.full_epochs)


def _write_documents(paths: SearchPaths, result: SearchResult, overwrite: bool) -> None:
    """OUT.search.svg, then OUT.search.json (last: the mark that the search is complete)."""
    import json

    from mishield.fileio import atomic_output
    from mishield.search.front import front_svg

    doc = result.to_dict()
    with atomic_output(paths.svg, overwrite=overwrite) as tmp:
        tmp.write_text(front_svg(doc))
    with atomic_output(paths.json, overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
