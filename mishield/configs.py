"""The one rule for the public calls' configuration objects and their former keyword form.

Each public call takes one typed configuration (`AuditConfig`, `HardenConfig`, `SurrogateConfig`,
`EvalModelConfig`, `TrainingRecipe` with `RunOptions`), the way timm's `create_model` or Hugging
Face's `TrainingArguments` do. The keyword arguments they replaced still work for one release:
they become the configuration, with a DeprecationWarning that names the new form.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import TypeVar

from mishield.errors import UsageError

T = TypeVar("T")


def resolve_config(call: str, config: T | None, keywords: dict, kind: type, build: Callable[[dict], T] | None = None) -> T:
    """`config`, or (deprecated) a `kind` built from the former `keywords` (by `build`, default `kind(**keywords)`)."""
    if not keywords:
        return config if config is not None else kind()
    names = ", ".join(sorted(keywords))
    if config is not None:
        raise UsageError(f"pass the options of `{call}` in `config` or as keywords, not both (got `config` and {names}).")
    if build is None:
        known = {f.name for f in dataclasses.fields(kind)}
        unknown = sorted(set(keywords) - known)
        if unknown:
            raise UsageError(f"`{call}` got unexpected keyword argument(s) {', '.join(unknown)}; "
                             f"its options are the fields of `config` ({kind.__name__}).")
        build = lambda given: kind(**given)
    warnings.warn(f"{call}(..., {names}) is deprecated; pass config={kind.__name__}(...) instead.",
                  DeprecationWarning, stacklevel=3)
    return build(keywords)
