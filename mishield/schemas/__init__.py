"""JSON Schemas of every command's `--json` document, shipped with the package.

A pipeline validates what it parses against `load_schema(command)`; the schema's `$id` ends in
its major version (`https://mishield.dev/schemas/audit/1`). Within a version keys are only added,
never removed, renamed or retyped, so consumers must ignore keys they do not know
(docs/pipelines.md describes the contract).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

COMMANDS = ("inspect", "harden", "harden-search", "export", "audit", "prior-train", "surrogate-train", "train-eval", "demo", "env")


def schema_text(command: str) -> str:
    """The schema file of COMMAND (one of COMMANDS) as text."""
    if command not in COMMANDS:
        raise ValueError(f"no JSON schema for {command!r}; known: {', '.join(COMMANDS)}.")
    return resources.files(__name__).joinpath(f"{command}.schema.json").read_text(encoding="utf-8")


def load_schema(command: str) -> dict[str, Any]:
    """The schema of COMMAND's `--json` output as a dict (JSON Schema draft 2020-12)."""
    return json.loads(schema_text(command))
