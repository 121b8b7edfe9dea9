"""The defence options' values, read and checked once, without torch.

`harden`'s configuration (`HardenConfig`), the command line (`--erase P[,MIN,MAX]`, `--neg-ls`)
and the training recipe (`mishield.training.TrainingRecipe`) all go through these functions, so
a value means the same and is refused with the same sentence wherever it is given. The defences
themselves live in the trainers (docs/architecture.md §4):

* random erasing (MIDRE, TMLR 2025): `erase` = (p, min_area, max_area); their configuration is
  p = 1.0 with an erased area of 0.1-0.8 of the image (`MIDRE_ERASE`);
* negative label smoothing (Struppek et al., ICLR 2024): a factor below 0 (their code: -0.05,
  `NEGATIVE_LS_ALPHA`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from mishield.errors import UsageError

MIDRE_ERASE = (1.0, 0.1, 0.8)  # random erasing's p, min and max erased area in MIDRE's configuration
NEGATIVE_LS_ALPHA = -0.05  # Struppek et al.'s negative label-smoothing factor


def check_erase(erase) -> tuple[float, float, float]:
    """`erase` as (p, min_area, max_area) floats, or a UsageError naming what is wrong."""
    try:
        p, low, high = (float(v) for v in erase)
    except (TypeError, ValueError):
        raise UsageError(f"`erase` must be three numbers (p, min_area, max_area), got {erase!r}.") from None
    if not 0.0 < p <= 1.0:
        raise UsageError(f"`erase` probability p must lie in (0, 1] (MIDRE uses 1.0), got {p}.")
    if not 0.0 < low <= high < 1.0:
        raise UsageError(
            "`erase` areas must satisfy 0 < min_area <= max_area < 1 (fractions of the image; "
            f"MIDRE uses 0.1 and 0.8), got {low} and {high}."
        )
    return (p, low, high)


def parse_erase(value) -> tuple[float, float, float] | None:
    """`--erase`'s forms: "P" or "P,MIN,MAX" (a string, as on the command line and in recipes), a
    number p (MIDRE's areas 0.1-0.8), or a sequence of one or three numbers; None stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise UsageError(f"`erase` takes P or P,MIN,MAX (e.g. 1.0 or 1.0,0.1,0.8), not {value!r}.")
    if isinstance(value, (int, float)):
        parts: Sequence = [value]
    elif isinstance(value, str):
        parts = [v.strip() for v in value.split(",")]
    else:
        parts = list(value)
    try:
        numbers = [float(v) for v in parts]
    except (TypeError, ValueError):
        raise UsageError(f"`erase` takes P or P,MIN,MAX as numbers (e.g. 1.0 or 1.0,0.1,0.8), not {value!r}.") from None
    if len(numbers) == 1:
        numbers += list(MIDRE_ERASE[1:])
    if len(numbers) != 3 or not all(math.isfinite(v) for v in numbers):
        raise UsageError(f"`erase` takes one number P or three P,MIN,MAX (e.g. 1.0,0.1,0.8), not {value!r}.")
    return check_erase(numbers)


def check_neg_ls(alpha) -> float | None:
    """The negative label-smoothing factor: a number strictly between -1 and 0 (None: off).

    A positive factor is ordinary label smoothing, which Struppek et al. found makes inversion
    attacks *more* successful; `harden` refuses it rather than label it a defence."""
    if alpha is None:
        return None
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise UsageError(f"`neg_ls` must be a number between -1 and 0 (Struppek et al. use {NEGATIVE_LS_ALPHA}), got {alpha!r}.")
    if not -1.0 < alpha < 0.0:
        raise UsageError(
            f"`neg_ls` must lie strictly between -1 and 0 (Struppek et al. use {NEGATIVE_LS_ALPHA}), got {alpha}; "
            "a positive factor is ordinary label smoothing, which helps the attack."
        )
    return float(alpha)


def check_count(name: str, value, minimum: int = 0) -> None:
    """A whole number of epochs or stages, `minimum` or more (None allowed: the default)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"`{name}` must be a whole number, {minimum} or more, got {value!r}.")
