"""The combinations a defence search tries: a small, named grid of surgery x loss x data defences.

    default  RoLSS, SSF k = 0.2, SSF k = 0.5, each alone, + negative LS, + erasing, + both (12)
    quick    RoLSS and SSF k = 0.2, each alone and with negative LS + erasing (4)

The surgery methods are Koh et al.'s (ECCV 2024): RoLSS removes the last stage's skips, SSF scales
them by k (0.2 is the paper's additive default; 0.5 keeps more of the skip and so, by the paper's
argument, costs less accuracy and protects less). Negative label smoothing uses Struppek et al.'s
factor -0.05 (ICLR 2024) on the harden schedule's default ramp; erasing uses MIDRE's (TMLR 2025)
p = 1.0, area 0.1-0.8. TL-DMI and frozen stages are not in the grids: TL-DMI replaces the starting
weights by a public pre-training, which the search would have to repeat per candidate. For a
DenseNet (concatenative skips) pass your own grid: SSF's k there is a fraction of channels and the
paper's default is 0.01, not 0.2.

No torch here.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from mishield.defences import MIDRE_ERASE, NEGATIVE_LS_ALPHA, check_neg_ls, parse_erase
from mishield.errors import UsageError


@dataclass(frozen=True)
class Candidate:
    """One combination: a surgery (`method`, SSF's `alpha`) with negative label smoothing
    (`neg_ls`, its factor) and random erasing (`erase`, (p, min_area, max_area)) or without."""

    method: str
    alpha: float | None = None
    neg_ls: float | None = None
    erase: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        # The surgery's own checks (`mishield.surgery.methods`) run when the search builds each
        # candidate's HardenConfig (SearchConfig.validate); importing them here would import torch.
        object.__setattr__(self, "neg_ls", check_neg_ls(self.neg_ls))
        object.__setattr__(self, "erase", parse_erase(self.erase))

    @property
    def name(self) -> str:
        """A short unique label: `rolss`, `ssf-0.2+neg-ls+erase`, ..."""
        head = self.method if self.method == "rolss" or self.alpha is None else f"{self.method}-{self.alpha:g}"
        parts = [head]
        if self.neg_ls is not None:
            parts.append("neg-ls" if self.neg_ls == NEGATIVE_LS_ALPHA else f"neg-ls{self.neg_ls:g}")
        if self.erase is not None:
            parts.append("erase" if self.erase == MIDRE_ERASE else "erase-" + "-".join(f"{v:g}" for v in self.erase))
        return "+".join(parts)

    def changes(self) -> dict:
        """The `HardenConfig` fields this candidate sets."""
        return {"method": self.method, "alpha": self.alpha, "neg_ls": self.neg_ls, "erase": self.erase}

    def to_dict(self) -> dict:
        return {"name": self.name, "method": self.method, "alpha": self.alpha, "neg_ls": self.neg_ls,
                "erase": None if self.erase is None else list(self.erase)}


def make_grid(surgeries: Sequence[tuple[str, float | None]], neg_ls: Iterable[float | None] = (None, NEGATIVE_LS_ALPHA),
              erase: Iterable[tuple | None] = (None, MIDRE_ERASE)) -> tuple[Candidate, ...]:
    """Every surgery with every negative-LS and erasing setting (None: off), surgery-major."""
    return tuple(Candidate(m, a, n, e) for (m, a), n, e in itertools.product(surgeries, tuple(neg_ls), tuple(erase)))


GRIDS: dict[str, tuple[Candidate, ...]] = {
    "default": make_grid([("rolss", None), ("ssf", 0.2), ("ssf", 0.5)]),
    "quick": (Candidate("rolss"), Candidate("rolss", None, NEGATIVE_LS_ALPHA, MIDRE_ERASE),
              Candidate("ssf", 0.2), Candidate("ssf", 0.2, NEGATIVE_LS_ALPHA, MIDRE_ERASE)),
}


def resolve_grid(grid: str | Sequence[Candidate]) -> tuple[Candidate, ...]:
    """A grid by name (`GRIDS`) or as given; refuses an empty grid and repeated candidates."""
    if isinstance(grid, str):
        if grid not in GRIDS:
            raise UsageError(f"`grid` must be one of {', '.join(GRIDS)} or a list of candidates, not {grid!r}.")
        return GRIDS[grid]
    found = tuple(grid)
    if not found or not all(isinstance(c, Candidate) for c in found):
        raise UsageError("`grid` must name a grid or list at least one Candidate.")
    names = [c.name for c in found]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UsageError(f"`grid` lists {repeated[0]} more than once; each candidate is trained and audited once.")
    return found
