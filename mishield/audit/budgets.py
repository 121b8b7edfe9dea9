"""The smallest attack budget an audit may gate on, per prior kind (docs/audit.md, "Budgets").

Below these numbers the attack is too weak to say anything about the model: an audit that fails
to reconstruct with a tiny budget would read as "private". `budget_warnings` names every shortfall;
`audit()` refuses a gate (`max_attack_acc`) with any of them unless `allow_weak_budget`, and the
report then carries them as `weak_audit` warnings.

`travel` is the sum of the lr over the run's steps (the schedule's cuts included): with PPA's
betas Adam moves each latent coordinate by about lr per step, so this bounds how far a latent can
go. The calibration curve on the DCGAN z-space (docs/audit.md) shows the target's confidence on
the kept images plateaus after a travel of about 0.5 (10 steps at lr 0.05, or 100 at 0.005); the
minimum of 1.0 leaves a factor of two.
"""

from __future__ import annotations

from torch import nn

MINIMUMS: dict[str, dict[str, float]] = {
    # z-space (mishield's DCGAN, any z ~ N(0, I) generator): the calibration curve, with margin.
    "generator": {"iterations": 30, "travel": 1.0, "samples": 200, "candidates": 8, "keep": 4, "final_augmentations": 4},
    # w-space: PPA's FaceScrub budget travels 0.156 (30 x 0.005 + 10 x 0.0005 + 10 x 0.00005); the
    # seed paper's C=16, K=8 are the smallest pools in the literature this follows.
    "stylegan": {"iterations": 50, "travel": 0.15, "samples": 1000, "candidates": 16, "keep": 8, "final_augmentations": 20},
    # pixels: DeepInversion synthesises for thousands of steps; a tenth of its 2000 stays "CI only".
    "pixels": {"iterations": 1000, "travel": 20.0, "samples": 1, "candidates": 8, "keep": 4, "final_augmentations": 4},
}
MINIMUMS["prior"] = MINIMUMS["generator"]  # a bare Prior samples z ~ N(0, I) like a generator


def travel(config) -> float:
    """Sum of the lr over all steps of a resolved config (the most a coordinate can move, roughly)."""
    return sum(config.lr_at(step) for step in range(config.iterations))


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None for m in model.modules())


def budget_warnings(config, prior, targets: list[nn.Module] | nn.Module | None = None) -> list[str]:
    """One sentence per way the (resolved) budget falls below the prior kind's documented minimum.

    With `targets`, the generator-free mode also names each target without BatchNorm: without
    running statistics to match, pixel optimisation degenerates into adversarial noise.
    """
    config = config.resolve(prior)
    floor = MINIMUMS.get(prior.kind, MINIMUMS["generator"])
    out = [
        f"{name} {getattr(config, name)} is below the minimum of {int(floor[name])} for a {prior.kind} prior"
        for name in ("iterations", "samples", "candidates", "keep", "final_augmentations")
        if getattr(config, name) < floor[name]
    ]
    moved = travel(config)
    if moved < floor["travel"]:
        out.append(f"the lr schedule moves a latent by at most {moved:.3g} (sum of lr over steps), below the minimum of "
                   f"{floor['travel']:g} for a {prior.kind} prior")
    if prior.kind == "pixels" and targets is not None:
        for i, t in enumerate(targets if isinstance(targets, (list, tuple)) else [targets]):
            if not has_batchnorm(t):
                out.append(f"model {i + 1} has no BatchNorm layer, so the generator-free attack has no image statistics "
                           "to match and produces adversarial noise")
    return out


def below_minimum(config, prior, targets=None) -> bool:
    return bool(budget_warnings(config, prior, targets))
