"""The transfer attack: PPA's three phases against surrogates alone; the audited model is never queried.

Every other attack reads the released model on generated images, in its gradients (PPA, LOMMA),
its scores (the black-box attack's fitness) or at least in initial and final selection. A model
that answers generated images with confident junk (a detector of prior samples, issue 20) fools
all of them, while an attacker who holds the weights simply removes the detector. This attacker
never trusts the released model's outputs on generated images: surrogates distilled from its
soft outputs on *natural* public images (`mishield.training.distillation`, as LOMMA distils them)
stand in for it in every phase:

* initial selection scores the pool by the surrogates' ensemble (the mean of their
  log-probabilities: a geometric-mean ensemble, whose margins are the engine's selection score);
* the optimisation follows the mean of the surrogates' losses (the engine's step with the first
  surrogate in the target's place and the others as LOMMA's augmentation);
* final selection, and with it the selection-only baseline, scores by the same ensemble.

The evaluation models then judge the kept images as for every other attack. `TransferAttack` takes
no target argument at all, so no code path can reach the audited model.

Surrogates distilled on the prior's *generated* images would copy a detector's junk; the audit
therefore takes them from `mishield surrogate train --public` (natural public images), never
distils them itself (docs/audit.md "The transfer attack").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mishield.attack.config import AttackConfig
from mishield.attack.engine import InversionAttack, Surrogate
from mishield.attack.priors import Prior
from mishield.errors import UsageError
from mishield.runtime import Runtime, autocast


class TransferAttack(InversionAttack):
    """Initial selection -> optimisation -> final selection, all on `surrogates` (model, preprocessing) pairs.

        result = TransferAttack(prior, [(surrogate, preprocessing)], make_config("ci"), runtime).run(classes)

    The result's confidences, margins and top-1 shares are the surrogate ensemble's: the attack's own view.
    """

    def __init__(self, prior: Prior, surrogates: Sequence[Surrogate], config: AttackConfig, runtime: Runtime):
        if not surrogates:
            raise UsageError("the transfer attack needs at least one surrogate; distil one with `mishield surrogate train`.")
        (first, first_pre), rest = surrogates[0], list(surrogates[1:])
        super().__init__(prior, first, first_pre, config, runtime, surrogates=rest)

    @torch.no_grad()
    def scoring_logits(self, images: torch.Tensor, theta: torch.Tensor | None) -> torch.Tensor:
        """The mean log-probabilities of the surrogates on the same crops of `images` (float32)."""
        with autocast(self.runtime):
            outputs = self.step.outputs(images, theta)
        return torch.stack([logits.float().log_softmax(dim=1) for logits, _ in outputs]).mean(dim=0)
