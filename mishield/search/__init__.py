"""The privacy/utility search of `mishield harden --search` (docs/search.md).

    grid.py       Candidate, the named grids (default, quick), make_grid
    config.py     SearchConfig: base training options, grid, budgets, the audit's settings
    state.py      the work folder beside the output, and how a rerun continues it
    runner.py     search_defences: train every candidate, ONE audit, select, fine-tune the pick
    selection.py  the selection rule and the plain statements of what was (not) found
    results.py    SearchResult: OUT.search.json
    front.py      OUT.search.svg: the privacy/utility front

`from mishield.search import SearchConfig, Candidate` does not import torch; `search_defences`
(`mishield.search_defences`) imports it when called.
"""

from mishield.search.config import SearchConfig
from mishield.search.grid import GRIDS, Candidate, make_grid
from mishield.search.results import SearchResult


def search_defences(model, **kwargs):
    """`mishield.search.runner.search_defences` (imported on first use: it needs torch)."""
    from mishield.search.runner import search_defences as run

    return run(model, **kwargs)


__all__ = ["GRIDS", "Candidate", "SearchConfig", "SearchResult", "make_grid", "search_defences"]
