"""`SearchResult`: what a defence search found. `to_dict()` is OUT.search.json (schema
`mishield.harden-search`, version 1; mishield/schemas/harden-search.schema.json) and what
`mishield harden --search --json` prints. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mishield.audit.results import finite

SCHEMA = "mishield.harden-search"
SCHEMA_VERSION = 1


@dataclass
class SearchResult:
    """One search: the original's and every candidate's figures, the pick and why, the statements.

    `candidates` are rows in grid order (see `mishield.search.selection.judge`) with each one's
    `recipe`, `file` and `train_seconds` added. `out` is the hardened model (None when nothing was
    within the budget); `final` the fully fine-tuned pick's re-measured figures (None without
    `remeasure` or without a pick).
    """

    model: str
    out: Path | None
    files: dict[str, str]
    options: dict
    baseline: dict
    candidates: list[dict]
    pick: str | None
    statements: list[str]
    selection_rule: str
    final: dict | None = None
    warnings: list[str] = field(default_factory=list)
    created: str = ""
    mishield_version: str = ""
    seconds: float = 0.0
    resumed: bool = False

    @property
    def picked(self) -> dict | None:
        return next((c for c in self.candidates if c["name"] == self.pick), None)

    @property
    def within_budget(self) -> list[dict]:
        return [c for c in self.candidates if c["within_budget"]]

    def to_dict(self) -> dict[str, Any]:
        return finite({
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "created": self.created,
            "mishield_version": self.mishield_version,
            "model": self.model,
            "out": None if self.out is None else str(self.out),
            "files": dict(self.files),
            "options": self.options,
            "selection_rule": self.selection_rule,
            "baseline": self.baseline,
            "candidates": self.candidates,
            "pick": self.pick,
            "final": self.final,
            "statements": self.statements,
            "warnings": self.warnings,
            "seconds": round(self.seconds, 2),
            "resumed": self.resumed,
        })
