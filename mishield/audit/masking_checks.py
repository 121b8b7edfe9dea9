"""Masking diagnostics per audited model, and which attacks may decide its verdict (docs/audit.md "Masking").

A "defence" that only breaks the gradients an attacker follows (a detached or rounded input,
logits scaled until the softmax saturates), or that answers generated images differently from
natural ones (a detector of prior samples), lowers the gradient attacks' accuracy without making
the model more private (issue 20; Athalye et al., ICML 2018). The audit measures, per model, on
the same images and in the attacker's view (prior image in [-1, 1] -> the model's input contract
-> the model):

* input gradients of the cross-entropy (`mishield.attack.masking`) on private validation images
  (true labels) and on prior samples (own top-1), against a reference: the first audited model,
  and for the first model the first evaluation model (an independently trained classifier of the
  same private data, which has no reason to mask);
* determinism: two passes over the same images must give the same logits;
* agreement with its own surrogates on natural (private validation) and generated (prior) images,
  when it has surrogates: a detector shows as disagreement on generated images only;
* the gradient attack's loss curve (the first attack that follows the model's gradients alone):
  how much its mean loss fell from the first tenth of the steps to the last, against the reference's.

Each finding is a signal of one of two kinds:

* `gradients`: the gradients are broken or random (zero, non-finite, orders of magnitude off on
  real images, a stochastic model, a flat loss curve). Attacks that follow the model's gradients
  (`AttackKind.target_gradients`: ppa, lomma) cannot decide the verdict; the black-box and
  transfer attacks can.
* `generated`: the model treats generated inputs differently (gradient signals on prior images
  only, a real/prior asymmetry, surrogate disagreement on generated images only). Every attack
  that reads the model's outputs on generated images (`AttackKind.target_outputs`: all but
  transfer) cannot decide; only the transfer attack can.

`cannot_decide` applies them to an attack; `mishield.audit.judging.model_verdict` then decides on
the rest, or calls the audit inconclusive and names the masking when no attack is left.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from mishield.attack.engine import chunks
from mishield.attack.inputs import ModelInput
from mishield.attack.masking import (
    GradientStats,
    MaskingThresholds,
    gradient_stats,
    input_gradients,
    masking_signals,
)

# Images each diagnostic uses: enough for a stable median, cheap next to the attack (one forward
# and backward pass per image and model).
REAL_IMAGES = 256
PRIOR_IMAGES = 256
PRIOR_SEED_SALT = 104729  # the diagnostics' prior samples are their own draw, not the attack's pool
# Two passes over the same images differing by more than this (relative to the logits' scale) make
# a stochastic model: float32 on one device repeats exactly; a few ulps of slack for fused kernels.
DETERMINISM_TOLERANCE = 1e-4


@dataclass(frozen=True)
class MaskingLimits:
    """The thresholds of every diagnostic (docs/audit.md "Masking" gives the measurements behind them)."""

    gradients: MaskingThresholds = field(default_factory=MaskingThresholds)  # zero fraction, norm and asymmetry factors
    agreement_gap: float = 0.2  # surrogate agreement on generated images this far below natural images'
    agreement_excess: float = 0.1  # ... and, after the first model, a gap this much wider than the first model's
    normal_factor: float = 10.0  # real-image gradient norm within this factor of the reference's: "normal on natural images"
    flat_share: float = 0.1  # a loss-curve drop below this share of the reference's drop ...
    flat_drop: float = 0.005  # ... and below this relative drop is flat (the second alone without a reference)
    flat_gain: float = 0.1  # ... unless the attack's kept images beat the selection-only baseline by this much
    curve_steps: int = 10  # fewer optimisation steps give no curve to read

    def to_dict(self) -> dict:
        return {"zero_excess": self.gradients.zero_excess, "norm_factor": self.gradients.norm_factor,
                "asymmetry_factor": self.gradients.asymmetry_factor, "agreement_gap": self.agreement_gap,
                "agreement_excess": self.agreement_excess,
                "normal_factor": self.normal_factor,
                "flat_share": self.flat_share, "flat_drop": self.flat_drop, "flat_gain": self.flat_gain,
                "curve_steps": self.curve_steps}  # fmt: skip


LIMITS = MaskingLimits()


class AttackerView(nn.Module):
    """A classifier as the attacker sees it: images in [-1, 1] at the prior's size -> its input contract -> logits."""

    def __init__(self, model: nn.Module, preprocessing, device: torch.device):
        super().__init__()
        self.model, self.model_input = model, ModelInput(preprocessing, device)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.model_input(images))


@dataclass
class ImageSets:
    """The diagnostics' images, in [-1, 1] at the prior's size, on the device."""

    real: torch.Tensor
    labels: torch.Tensor
    generated: torch.Tensor


def image_sets(items, prior, image_shape, device: torch.device, seed: int) -> ImageSets:
    """Up to REAL_IMAGES private validation images (spread over the folder) and PRIOR_IMAGES prior samples.

    Real images go through the same degradation as the evaluator's (`trust.degraded_batches`): read
    at the prior's size in 8 bits. Prior samples stay the generator's continuous output, which is
    what every attack feeds the model: a model that tells generated images apart must be probed
    with them as they are."""
    from mishield.audit.trust import _spread, degraded_batches

    chosen = _spread(items, REAL_IMAGES)
    batches = list(degraded_batches(chosen, image_shape))
    real = torch.cat([b for b, _ in batches]) if batches else torch.zeros(0, *image_shape, dtype=torch.uint8)
    labels = torch.cat([y for _, y in batches]) if batches else torch.zeros(0, dtype=torch.long)
    prior.to(device)
    latents = prior.sample(PRIOR_IMAGES, torch.Generator().manual_seed(seed + PRIOR_SEED_SALT), device)
    with torch.no_grad():  # the generator's own output, as the attack feeds it to the model (not rounded to 8 bits)
        generated = torch.cat([prior.generate(latents[p]).float().clamp(-1, 1) for p in chunks(PRIOR_IMAGES, 64)])
    return ImageSets(real.to(device).float() / 127.5 - 1.0, labels.to(device), generated.to(device))


def gradient_statistics(view: nn.Module, images: ImageSets, batch_size: int) -> dict[str, GradientStats]:
    """`GradientStats` of the view's cross-entropy input gradients on real (true labels) and prior images (own top-1)."""
    out = {}
    if images.real.shape[0]:
        out["real"] = gradient_stats(input_gradients(view, images.real, images.labels, batch_size))
    out["prior"] = gradient_stats(input_gradients(view, images.generated, None, batch_size))
    return out


@torch.no_grad()
def logits_of(view: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([view(images[p]).float() for p in chunks(images.shape[0], batch_size)]) if images.shape[0] else torch.zeros(0, 0)


def determinism(view: nn.Module, images: ImageSets, batch_size: int) -> dict:
    """Two passes over the same real and prior images: the largest logit difference, relative to the logits' scale."""
    both = torch.cat([images.real, images.generated])
    first, second = logits_of(view, both, batch_size), logits_of(view, both, batch_size)
    scale = float(first.abs().max()) if first.numel() else 0.0
    difference = float((first - second).abs().max()) if first.numel() else 0.0
    relative = difference / (scale + 1e-12)
    return {"deterministic": not relative > DETERMINISM_TOLERANCE, "max_difference": difference, "relative_difference": relative}


def surrogate_agreement(view: nn.Module, surrogate_views: list[nn.Module], images: ImageSets, batch_size: int) -> dict | None:
    """Mean top-1 agreement of the model with its surrogates on natural and on generated images (None without surrogates)."""
    if not surrogate_views:
        return None
    record = {}
    for name, x in (("natural", images.real), ("generated", images.generated)):
        if not x.shape[0]:
            record[name], record[f"{name}_n"] = None, 0
            continue
        own = logits_of(view, x, batch_size).argmax(1)
        shares = [float((logits_of(s, x, batch_size).argmax(1) == own).float().mean()) for s in surrogate_views]
        record[name], record[f"{name}_n"] = sum(shares) / len(shares), int(x.shape[0])
    return record


def curve_drop(curve: list[float]) -> float | None:
    """(mean of the first tenth of the steps - mean of the last tenth) / |mean of the first tenth|; None when too short."""
    if len(curve) < LIMITS.curve_steps:
        return None
    tenth = max(1, len(curve) // 10)
    head, tail = sum(curve[:tenth]) / tenth, sum(curve[-tenth:]) / tenth
    return (head - tail) / abs(head) if head != 0 and math.isfinite(head) and math.isfinite(tail) else None


def signals(model: dict, reference: dict | None, limits: MaskingLimits = LIMITS) -> list[dict]:
    """Every masking signal of one model's measurements (`measure` records) against its reference's, each
    `{"kind": "gradients" | "generated", "reason": one sentence}`. Pure: the thresholds' tests call it."""
    found = []
    stats, ref_stats = model["gradient_stats"], (reference or {}).get("gradient_stats") or {}
    on_real = masking_signals({k: v for k, v in stats.items() if k == "real"}, ref_stats, limits.gradients)
    on_prior = masking_signals({k: v for k, v in stats.items() if k == "prior"}, ref_stats, limits.gradients)
    together = masking_signals(stats, ref_stats, limits.gradients)
    asymmetry = [r for r in together if r not in on_real and r not in on_prior]
    found += [{"kind": "gradients", "reason": r} for r in on_real]
    # signals on prior images, or a real/prior asymmetry, while the model is normal on real images:
    # it treats generated inputs apart; where its real-image gradients are off as well, they are masked
    apart = "generated" if _normal_on_real(stats, ref_stats, limits) else "gradients"
    found += [{"kind": apart, "reason": r} for r in [*on_prior, *asymmetry]]
    if not model["determinism"]["deterministic"]:
        found.append({"kind": "gradients", "reason": f"two passes over the same images gave logits differing by "
                      f"{model['determinism']['relative_difference']:.2g} of their scale: the model is stochastic, "
                      "so a gradient or score the attacker reads is noise (report it; an attacker averages it away)."})
    found += _agreement_signal(model.get("surrogate_agreement"), (reference or {}).get("surrogate_agreement"), limits)
    found += _curve_signal(model.get("loss_drop"), (reference or {}).get("loss_drop"), model.get("loss_attack"), limits,
                           model.get("gain_over_selection"))
    return found


def _agreement_gap(agreement: dict | None) -> float | None:
    """Surrogate agreement on natural images minus that on generated ones (None when either is missing)."""
    natural, generated = (agreement or {}).get("natural"), (agreement or {}).get("generated")
    return None if natural is None or generated is None else natural - generated


def _agreement_signal(agreement: dict | None, reference: dict | None, limits: MaskingLimits) -> list[dict]:
    """A model that agrees with its own surrogates far less on generated images than on natural ones.

    Honest models drop too where the surrogates are weak and the classes many (generated images are
    ambiguous; measured on 129 Omniglot characters with 5-epoch ResNet-18 surrogates: gaps of 16-40
    points over five training seeds, for the undefended target as for every defence). So a gap
    counts above `agreement_gap` and, when the first audited model's gap is known, only where it is
    also `agreement_excess` wider than that one (a detector's generated-image answers agree with
    nothing: its gap is the whole natural agreement).
    """
    gap, base = _agreement_gap(agreement), _agreement_gap(reference)
    if gap is None or gap <= limits.agreement_gap or (base is not None and gap <= base + limits.agreement_excess):
        return []
    than = "" if base is None else f" (the first audited model's gap: {base:.0%})"
    return [{"kind": "generated", "reason": f"the model agrees with its own surrogates on {agreement['natural']:.0%} of natural "
             f"images but on {agreement['generated']:.0%} of generated ones{than}: it answers generated inputs differently."}]


def _normal_on_real(stats: dict, reference: dict, limits: MaskingLimits) -> bool:
    """No signal on real images and a median norm within `normal_factor` of the reference's there."""
    real, ref = stats.get("real"), reference.get("real")
    if real is None or ref is None or masking_signals({"real": real}, {"real": ref}, limits.gradients):
        return False
    if not (ref.median_norm > 0 and math.isfinite(ref.median_norm) and math.isfinite(real.median_norm)):
        return False
    return 1 / limits.normal_factor <= real.median_norm / ref.median_norm <= limits.normal_factor


def _curve_signal(drop: float | None, reference: float | None, attack: str | None, limits: MaskingLimits,
                  gain: float | None = None) -> list[dict]:
    # The relative drop depends on the loss's scale: the Poincaré loss of 129 classes fell by 0.08 % on
    # every Omniglot model of the study while PPA raised attack accuracy from 10-15 % (selection only)
    # to 45-62 %. Where the optimisation visibly paid off, the curve is not evidence of masking.
    if drop is None or (gain is not None and gain >= limits.flat_gain):
        return []
    # flat in absolute terms and, given a reference that did move, next to it too: a real defence
    # that only weakens the gradients (RoLSS's own argument) slows the curve, it does not stop it
    bar = limits.flat_drop if reference is None or reference <= 0 else min(limits.flat_drop, limits.flat_share * reference)
    if drop >= bar:
        return []
    shown = "" if reference is None else f" (the reference model's: {reference:.1%})"
    return [{"kind": "gradients", "reason": f"the {attack} attack's loss fell by {drop:.1%} from its first to its last tenth of "
             f"steps{shown}: its gradients gave it nothing to follow."}]


def cannot_decide(kind, masking: dict | None) -> str | None:
    """Why an attack (an `AttackKind` or its `to_dict()`) cannot decide the verdict of a model with these
    diagnostics, or None when it can."""
    if not masking:
        return None
    get = kind.get if isinstance(kind, dict) else lambda k: getattr(kind, k)
    kinds = {s["kind"] for s in masking.get("signals", [])}
    if "generated" in kinds and get("target_outputs"):
        return "the model treats generated images differently, and this attack reads its outputs on them"
    if "gradients" in kinds and get("target_gradients"):
        return "the model's input gradients look masked, and this attack follows them"
    return None


def measure(view: nn.Module, images: ImageSets, batch_size: int) -> dict:
    """One model's (or a reference's) gradient statistics and determinism on the diagnostics' images."""
    return {"gradient_stats": gradient_statistics(view, images, batch_size), "determinism": determinism(view, images, batch_size)}


def loss_curve(parts_per_attack: list[list], attacks: list) -> tuple[str | None, list[float], float | None]:
    """The curve of the first attack that follows the model's gradients alone (else any that follows them),
    its ranks' curves averaged by their share of the classes, and that attack's gain over its selection-only
    baseline (the first evaluator's top-1 on the kept images minus on the I = 0 ones; None without one)."""
    ranked = sorted((k for k in attacks if k.target_gradients), key=lambda k: k.surrogates)
    for kind in ranked:
        parts = parts_per_attack[attacks.index(kind)]
        weighted = [(len(p.classes), p.loss_curve) for p in parts if p.loss_curve]
        if weighted:
            total = sum(w for w, _ in weighted)
            curve = [sum(w * c[i] for w, c in weighted) / total for i in range(len(weighted[0][1]))]
            return kind.name, curve, _gain(parts)
    return None, [], None


def _gain(parts: list) -> float | None:
    """The first evaluator's top-1 on the kept images minus on the selection-only ones, over every rank's classes."""
    kept = [p.evaluators[0].top1.float() for p in parts if p.evaluators]
    base = [p.evaluators[0].so_top1.float() for p in parts if p.evaluators and p.evaluators[0].so_top1 is not None]
    if not kept or len(base) != len(kept):
        return None
    return float(torch.cat([k.flatten() for k in kept]).mean() - torch.cat([b.flatten() for b in base]).mean())


def record(measured: dict, reference: dict, agreement: dict | None, attack: str | None, curve: list[float],
           gain: float | None = None) -> dict:
    """The report's `masking` entry of one model (before `signals` are added); `reference` holds the
    reference's `name`, `gradient_stats` and `loss_drop`."""
    return {"reference": reference["name"], "gradient_stats": measured["gradient_stats"],
            "reference_gradient_stats": reference["gradient_stats"], "determinism": measured["determinism"],
            "surrogate_agreement": agreement, "reference_surrogate_agreement": reference.get("surrogate_agreement"),
            "loss_attack": attack, "loss_drop": curve_drop(curve), "gain_over_selection": gain,
            "reference_loss_drop": reference.get("loss_drop"), "limits": LIMITS.to_dict()}  # fmt: skip


def diagnose(run, parts: list[list[list]]) -> list[dict]:
    """Every audited model's `masking` entry for report.json (rank 0, after the attacks).

    `run` is the `mishield.audit.runner.AuditRun` (its targets, first evaluation model, surrogates,
    private validation images, prior and runtime); `parts[model][attack]` its gathered outcomes."""
    device, batch = run.runtime.device, min(64, run.config.attack.batch_size)
    images = image_sets(run.data.val, run.image_prior(run.targets[0]), run.image_shape, device, run.config.attack.seed)
    evaluation = run.evaluations[0]
    view = AttackerView(evaluation.model, evaluation.preprocessing, device).to(device)
    reference = {"name": f"the evaluation model {evaluation.name}", "loss_drop": None, **measure(view, images, batch)}
    out = []
    for i, (target, own) in enumerate(zip(run.targets, run.surrogates)):
        view = AttackerView(target.model, target.preprocessing, device).to(device)
        measured = measure(view, images, batch)
        agreement = surrogate_agreement(view, [AttackerView(m, pre, device).to(device) for m, pre in own], images, batch)
        attack, curve, gain = loss_curve(parts[i], run.attacks)
        entry = record(measured, reference, agreement, attack, curve, gain)
        entry["signals"] = signals(entry, reference)
        out.append(entry)
        if i == 0:  # every later model is compared with the first audited one
            reference = {"name": f"the first audited model {target.name}", "loss_drop": entry["loss_drop"],
                         "surrogate_agreement": agreement, **measured}
    return out


def to_json(entry: dict) -> dict:
    """A `masking` entry with its statistics as plain dicts (report.json)."""
    kinds = {s["kind"] for s in entry["signals"]}
    plain = {key: {k: v.to_dict() if isinstance(v, GradientStats) else v for k, v in entry[key].items()}
             for key in ("gradient_stats", "reference_gradient_stats") if key in entry}  # fmt: skip
    return {**entry, **plain, "masked_gradients": "gradients" in kinds, "treats_generated_differently": "generated" in kinds}


def remedy(masking: dict) -> str:
    """Which attack can judge a model with these signals, in words."""
    if any(s["kind"] == "generated" for s in masking.get("signals", [])):
        return ("only the transfer attack, which never reads the model on generated images, can judge it: pass surrogates distilled "
                "from its answers on natural public images (mishield surrogate train, --surrogate) and run --attack transfer")
    return "run a gradient-free attack (--attack blackbox) or the transfer attack (with --surrogate)"


def masked_verdict(masking: dict, rows: list[tuple[str, str | None]]) -> dict:
    """The inconclusive verdict of a model that no attack that ran can judge, naming the masking."""
    found = " ".join(s["reason"] for s in masking.get("signals", []))
    ran = ", ".join(name for name, _ in rows)
    return {"status": "inconclusive", "passed": False, "cause": "masking", "attack": None,
            "reason": f"masking: {found} None of the attacks that ran ({ran}) can decide: {remedy(masking)}.",
            "excluded": {name: why for name, why in rows if why}}  # fmt: skip
