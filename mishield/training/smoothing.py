"""Label smoothing with a scheduled, possibly negative, factor (Struppek, Hintersdorf, Kersting,
"Be Careful What You Smooth For: Label Smoothing Can Be a Privacy Shield but Also a Catalyst for
Model Inversion Attacks", ICLR 2024).

The training target of a sample of class y among K classes is

    t = (1 - a) onehot(y) + a / K

and the loss is the cross-entropy against it, -sum_k t_k log softmax(z)_k. A positive factor a is
ordinary label smoothing, which the paper finds makes inversion attacks *more* successful; a
negative factor (their defence; their code uses a = -0.05) gives the true class a target above 1
and every wrong class a negative target, so the loss keeps pushing the wrong-class logits down
after the one-hot loss would have stopped. The resulting over-confident, flat-away-from-the-data
decision surface gives the attack's gradients little to climb.

torch's `F.cross_entropy(label_smoothing=)` refuses negative factors, so the loss is computed here
from its definition. With a < 0 it is unbounded below (a wrong-class probability driven to 0
keeps lowering it); the factor is small and the training loop's divergence check still guards.

Schedule. The paper holds the factor at 0 for the first epochs and then ramps it in: a model
trained with negative smoothing from the first step learns poorly. `smoothing_factor` is that
schedule as a pure function of the (global, 0-based) epoch. The paper's exact epoch numbers are
for training from scratch; mishield's runs range from a 10-epoch fine-tune to a 100-epoch TTS
schedule, so the default start and ramp are fractions of the run (`DEFAULT_START_FRACTION`,
`DEFAULT_RAMP_FRACTION`), resolved to whole epochs once the run's length is known and recorded as
such.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from mishield.errors import UsageError

NEGATIVE_ALPHA = -0.05  # the paper's code
DEFAULT_START_FRACTION = 0.5  # the factor is 0 for the first half of the run ...
DEFAULT_RAMP_FRACTION = 0.25  # ... then reaches `alpha` linearly over the next quarter, and stays


def smoothing_factor(alpha: float, start_epoch: int, ramp_epochs: int, epoch: int) -> float:
    """The smoothing factor of global epoch `epoch` (0-based).

    0 before `start_epoch`; from there it grows linearly, reaching `alpha` in the epoch
    `start_epoch + ramp_epochs - 1` (at once when `ramp_epochs` is 0 or 1), and stays at `alpha`.
    """
    if epoch < start_epoch:
        return 0.0
    return alpha * min(1.0, (epoch - start_epoch + 1) / max(ramp_epochs, 1))


def smoothed_cross_entropy(logits: Tensor, labels: Tensor, alpha: float) -> Tensor:
    """Mean over the batch of -sum_k t_k log softmax(logits)_k, t = (1 - alpha) onehot + alpha / K.

    Written as -(1 - alpha) log p_y - (alpha / K) sum_k log p_k, which never builds the (m, K)
    target; any alpha, negative included.
    """
    log_p = F.log_softmax(logits, dim=1)
    k = logits.shape[1]
    true_class = log_p.gather(1, labels.long()[:, None]).squeeze(1)
    return -((1.0 - alpha) * true_class + (alpha / k) * log_p.sum(dim=1)).mean()


@dataclass(frozen=True)
class LabelSmoothing:
    """The recipe's label smoothing: the final factor `alpha` and its schedule in global epochs.

    `start_epoch` / `ramp_epochs` left as None are resolved from the run's length by
    `TrainingRecipe` (`resolved`), so a recorded recipe always carries whole epochs.
    """

    alpha: float = NEGATIVE_ALPHA
    start_epoch: int | None = None
    ramp_epochs: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and -1.0 < self.alpha < 1.0):
            raise UsageError(
                f"`label_smoothing` alpha must be a number strictly between -1 and 1 "
                f"(the paper's defence uses {NEGATIVE_ALPHA}), got {self.alpha!r}."
            )
        for name in ("start_epoch", "ramp_epochs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise UsageError(f"`label_smoothing` {name} must be a whole number of epochs, 0 or more, got {value!r}.")

    def resolved(self, total_epochs: int) -> LabelSmoothing:
        """This schedule with its unset epochs filled in for a run of `total_epochs` epochs."""
        start = self.start_epoch if self.start_epoch is not None else round(DEFAULT_START_FRACTION * total_epochs)
        ramp = self.ramp_epochs if self.ramp_epochs is not None else max(1, round(DEFAULT_RAMP_FRACTION * total_epochs))
        return LabelSmoothing(self.alpha, int(start), int(ramp))

    def factor(self, epoch: int) -> float:
        if self.start_epoch is None or self.ramp_epochs is None:
            raise ValueError("resolve the label-smoothing schedule (LabelSmoothing.resolved) before using it")
        return smoothing_factor(self.alpha, self.start_epoch, self.ramp_epochs, epoch)

    def to_dict(self) -> dict:
        return {"alpha": self.alpha, "start_epoch": self.start_epoch, "ramp_epochs": self.ramp_epochs}
