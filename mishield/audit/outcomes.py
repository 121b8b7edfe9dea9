"""What one attack on one rank's classes hands to the judging: typed, per evaluator, per class.

A rank attacks its shard of the classes (`mishield.audit.distributed`) and every evaluation model
judges the kept reconstructions right there, so mostly small tensors cross processes: 0/1 hits and
distances per class and image. The one exception is the kept images' features in each feature
space (`mishield.audit.feature_spaces`): FID and the other distribution figures compare all
classes' reconstructions at once, so rank 0 needs them (at most 2,048 float32 per image). `--seeds` repeats the attack
on the same classes; `ShardOutcome.pooled` joins the repeats along the image axis, so the class
stays the unit of every interval (docs/audit.md, "Intervals").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace

import torch


def _mean_curve(curves: Sequence[list[float]]) -> list[float]:
    """The seeds' loss curves averaged step by step (they share I)."""
    return [sum(values) / len(values) for values in zip(*curves)] if curves and all(curves) else []


def _cat(values: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    return None if any(v is None for v in values) else torch.cat(list(values), dim=1)


@dataclass
class EvaluatorOutcome:
    """One evaluation model's verdict on one shard; every tensor is [classes, images]."""

    top1: torch.Tensor  # the attacked class is the evaluator's top-1 on a kept reconstruction
    top5: torch.Tensor
    knn: torch.Tensor  # squared feature distance to the nearest private image of the class
    unfiltered: torch.Tensor | None = None  # top-1 on every optimised candidate, before final selection
    so_top1: torch.Tensor | None = None  # top-1 on the selection-only (I = 0) baseline
    so_top5: torch.Tensor | None = None

    @classmethod
    def pooled(cls, runs: Sequence[EvaluatorOutcome]) -> EvaluatorOutcome:
        return cls(**{f.name: _cat([getattr(r, f.name) for r in runs]) for f in fields(cls)})


@dataclass
class ShardOutcome:
    """One target under one attack on one rank's classes (`classes[i]` is row i of every tensor).

    `target_conf` and `target_top1` are the scoring model's view of each kept image: the target's
    for every attack but the transfer attack, whose scoring models are the surrogates."""

    classes: list[int]
    target_conf: torch.Tensor  # the scoring model's confidence in the attacked class on each kept image
    evaluators: list[EvaluatorOutcome]  # in the order of the audit's evaluation models
    shown: torch.Tensor  # uint8 [classes, shown, C, H, W]: the reconstructions the report shows
    image_steps: int
    seconds: float
    timings: dict[str, float]
    features: list[torch.Tensor] = field(default_factory=list)  # per feature space: [classes, images, D]
    target_top1: torch.Tensor | None = None  # share of the final crops on which the scoring model ranks the class first
    loss_curve: list[float] = field(default_factory=list)  # the gradient attack's mean loss per step (this shard)
    queries: dict[str, int] | None = None  # the black-box attack's target queries by phase

    @classmethod
    def pooled(cls, runs: Sequence[ShardOutcome]) -> ShardOutcome:
        """Repeats of the same classes (seeds) as one outcome: images joined per class, work summed;
        the first run's reconstructions are the ones shown."""
        first = runs[0]
        if len(runs) == 1:
            return first
        return replace(
            first,
            target_conf=_cat([r.target_conf for r in runs]),
            target_top1=_cat([r.target_top1 for r in runs]),
            loss_curve=_mean_curve([r.loss_curve for r in runs]),
            queries=None if first.queries is None else {k: v if k == "per_candidate" else sum(r.queries[k] for r in runs)
                                                        for k, v in first.queries.items()},
            evaluators=[EvaluatorOutcome.pooled([r.evaluators[e] for r in runs]) for e in range(len(first.evaluators))],
            image_steps=sum(r.image_steps for r in runs),
            seconds=sum(r.seconds for r in runs),
            timings={k: sum(r.timings[k] for r in runs) for k in first.timings},
            features=[torch.cat([r.features[s] for r in runs], dim=1) for s in range(len(first.features))],
        )
