"""The surgery methods and their one validation (no torch: the harden config checks them early).

RoLSS removes the selected skips, SSF scales them by a fixed k in [0, 1] (k = 0 is RoLSS, k = 1 the
original model); the paper's default k is 0.2 for additive skips and 0.01 for concatenative ones.
"""

from __future__ import annotations

from mishield.errors import UsageError

METHODS = ("rolss", "ssf")
DEFAULT_SSF_ALPHA = {"add": 0.2, "concat": 0.01}  # the paper's defaults


def check_method(method: str, alpha: float | None = None) -> None:
    """Refuse an unknown method, an SSF k outside [0, 1], and a k given to RoLSS (whose k is 0)."""
    if method not in METHODS:
        raise UsageError(f"`method` must be rolss or ssf, not {method!r}.")
    if alpha is None:
        return
    if method == "rolss":
        raise UsageError("`alpha` applies to `method` ssf only (rolss is ssf with k = 0).")
    check_alpha(alpha)


def check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise UsageError(f"`alpha` must lie in [0, 1] (0 is RoLSS, 1 the original model), got {alpha}.")
