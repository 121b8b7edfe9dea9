"""Where a defence search keeps its work, and how a rerun finds it (docs/reliability.md).

    OUT.search.d/
        search-state.json      what this search is (its fingerprint) and what has finished
        prior.safetensors      the audit's prior, when trained from `public`
        eval.pt                the evaluation model, when trained from `data`
        candidates/NN-NAME.pt  each candidate after its short fine-tuning (a finished candidate)
        audit/                 the one audit of the original and every candidate (report.json last)
        final-audit/           the fully fine-tuned pick against the original (with `remeasure`)

Every file appears atomically once its step is done, so "the file exists" is the mark of a
finished step; a step interrupted half way keeps its own resumable state beside its output
(OUT.search.d/candidates/NN-NAME.pt.train-state, ...) and continues from there. A rerun with the
same fingerprint continues; another fingerprint is refused unless `overwrite` starts over.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from mishield.errors import UsageError

STATE_FILE = "search-state.json"


@dataclass(frozen=True)
class SearchPaths:
    """Every file a search writes, from its `out`."""

    out: Path

    @property
    def json(self) -> Path:
        return self.out.with_name(self.out.name + ".search.json")

    @property
    def svg(self) -> Path:
        return self.out.with_name(self.out.name + ".search.svg")

    @property
    def work(self) -> Path:
        return self.out.with_name(self.out.name + ".search.d")

    @property
    def state(self) -> Path:
        return self.work / STATE_FILE

    @property
    def prior(self) -> Path:
        return self.work / "prior.safetensors"

    @property
    def eval_model(self) -> Path:
        return self.work / "eval.pt"

    @property
    def audit(self) -> Path:
        return self.work / "audit"

    @property
    def final_audit(self) -> Path:
        return self.work / "final-audit"

    def candidate(self, index: int, name: str) -> Path:
        return self.work / "candidates" / f"{index:02d}-{re.sub(r'[^A-Za-z0-9_.+-]+', '_', name)}.pt"


class SearchState:
    """The search's record in `paths.state`: its fingerprint and the finished steps' notes."""

    def __init__(self, paths: SearchPaths, fingerprint: dict):
        self.paths = paths
        self.fingerprint = json.loads(json.dumps(fingerprint, default=str))  # as JSON reads it back
        self.notes: dict = {}
        self.resumed = False

    def read(self, overwrite: bool) -> SearchState:
        """Find the search to continue in `paths.work` (same fingerprint), writing nothing; with
        `overwrite` nothing is continued. Refuses a folder of another search or of something else."""
        work = self.paths.work
        if work.exists() and not work.is_dir():
            raise UsageError(f"{work} is a file; the search keeps its work in a folder of that name. Move it or choose another `out`.")
        if overwrite or not work.exists():
            return self
        if self.paths.state.is_file():
            saved = json.loads(self.paths.state.read_text())
            if saved.get("fingerprint") != self.fingerprint:
                raise UsageError(f"{work} holds a search with other inputs or options; rerun with those, pass `overwrite` "
                                 "to start over, or choose another `out`.")
            self.notes, self.resumed = dict(saved.get("notes") or {}), True
        elif any(work.iterdir()):
            raise UsageError(f"{work} exists but holds no search state; remove it, pass `overwrite`, or choose another `out`.")
        return self

    def start(self, overwrite: bool) -> None:
        """Create (or, with `overwrite`, recreate) the work folder and record this search in it."""
        if overwrite and self.paths.work.exists():
            shutil.rmtree(self.paths.work)
        self.paths.work.mkdir(parents=True, exist_ok=True)
        self.save()

    def note(self, key: str, value) -> None:
        self.notes[key] = value
        self.save()

    def save(self) -> None:
        from mishield.fileio import atomic_output

        with atomic_output(self.paths.state, overwrite=True) as tmp:
            tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "notes": self.notes}, indent=1, default=str))
