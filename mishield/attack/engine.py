"""The attack engine: PPA's initial selection, optimisation and final selection (docs/architecture.md §3, §4).

Speed is a feature here (docs/architecture.md §9): every step optimises one batch that mixes all target
classes (PPA runs one class per batch), under bf16 autocast and channels_last on CUDA,
optionally `torch.compile`d, and the step loop never waits for the device (no `.item()`, no
host-side random numbers: crops come from `augment.uniforms`, hashed on the device).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from mishield.attack.augment import (
    candidate_keys,
    crop_thetas,
    identity_thetas,
    uniforms,
)
from mishield.attack.config import FINAL_COUNTER_BASE, AttackConfig
from mishield.attack.inputs import ModelInput
from mishield.attack.losses import LOSSES, PenultimateTap, class_prototypes
from mishield.attack.priors import Prior
from mishield.errors import BadInputError, UsageError
from mishield.models.introspect import count_classes
from mishield.preprocessing import Preprocessing
from mishield.runtime import Runtime, autocast

ProgressFn = Callable[[str, int, int], None]
# A surrogate the attack step also optimises against: a model and its own input contract.
Surrogate = tuple[nn.Module, Preprocessing]


@dataclass
class InversionResult:
    """What one target gave away: the K kept reconstructions of each attacked class.

    Selection ranks by PPA's softmax confidence and breaks its ties by the logit margin
    (`rank_descending`): a temperature the owner puts on the logits (x1e3) saturates the softmax
    to exactly 1.0 for every image in the class, which would leave the choice to pool order.
    """

    classes: list[int]
    images: torch.Tensor  # uint8 (n_classes, K, C, H, W), CPU
    final_scores: torch.Tensor  # (n_classes, K): mean target confidence over A crops (best first)
    initial_scores: torch.Tensor  # (n_classes, C): confidence of the selected pool images
    image_steps: int
    seconds: float
    timings: dict = field(default_factory=dict)
    # The I = 0 baseline: final selection and kept images of the *initial* candidates (same pool,
    # same crops), so the optimiser's contribution is visible. None when switched off.
    selection_only: InversionResult | None = None
    final_margins: torch.Tensor | None = None  # (n_classes, K): mean logit margin over A crops (the tie-break)
    final_top1: torch.Tensor | None = None  # (n_classes, K): share of the A crops the scoring model ranks the class first
    loss_curve: list[float] = field(default_factory=list)  # mean per-image loss of each optimisation step


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def class_margins(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """z_c - max_{j != c} z_j for every row of `logits` (N, K) and every class in `classes`: (N, len(classes)), float32.

    Temperature-free (a positive factor on the logits scales every margin alike) and positive
    exactly where the model ranks the class first: selection's tie-break and the audit's "reached".
    """
    logits = logits.float()
    if logits.shape[1] < 2:
        return logits[:, classes]
    top = logits.topk(2, dim=1)
    others = torch.where(top.indices[:, :1] == classes[None, :], top.values[:, 1:2], top.values[:, :1])
    return logits[:, classes] - others


def label_margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """z_y - max_{j != y} z_j per row for its own label `labels[i]`: (N,), float32."""
    logits = logits.float()
    own = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf")).amax(dim=1)
    return own - others


def chunks(n: int, batch_size: int) -> Iterator[slice]:
    """Near-equal slices of at most `batch_size`: at most two distinct shapes for torch.compile."""
    count = max(1, math.ceil(n / batch_size))
    base, extra = divmod(n, count)
    start = 0
    for i in range(count):
        size = base + (1 if i < extra else 0)
        yield slice(start, start + size)
        start += size


class InversionStep:
    """The attack step: latents -> prior -> random crop -> target (and surrogates) -> identity loss, then Adam.

    The loss is the sum of the per-image losses; summing (not averaging) keeps each latent's gradient
    independent of how many other images share its batch, so Adam moves it the same way in any
    batch or on any rank. With surrogates (LOMMA's model augmentation), each image's loss is the
    mean over [target, *surrogates] of that model's loss: the generator and the crop run once
    and every model sees the same crop (one warp per distinct input contract).
    """

    def __init__(self, prior: Prior, target: nn.Module, preprocessing: Preprocessing, config: AttackConfig, runtime: Runtime,
                 surrogates: Sequence[Surrogate] = ()):
        config = config.resolve(prior)
        self.prior, self.target, self.config, self.runtime = prior, target, config, runtime
        self.optimizer: torch.optim.Optimizer | None = None  # the last run's, for inspection
        self.curve: torch.Tensor | None = None  # the last run's summed loss per step, on the device
        self.models = [target, *(model for model, _ in surrogates)]
        inputs: dict[tuple, ModelInput] = {}  # models with one input contract share one warp per step
        self.model_inputs = [_shared_input(inputs, pre, runtime.device) for pre in [preprocessing, *(pre for _, pre in surrogates)]]
        self.model_input = self.model_inputs[0]  # the target's: selection reads it
        self.loss = LOSSES[config.loss]
        names = ["the target", *(f"surrogate {i + 1}" for i in range(len(surrogates)))]
        self.taps = [PenultimateTap(m, n) if self.loss.needs_features else None for m, n in zip(self.models, names)]
        # Per model, the (K, D) class prototypes of a feature loss; set by InversionAttack before `run`.
        self.prototypes: list[torch.Tensor | None] = [None] * len(self.models)
        self.forward = torch.compile(self._loss) if config.compile else self._loss

    def outputs(self, images: torch.Tensor, theta: torch.Tensor | None) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(logits, penultimate features or None) of every model on the same crops of `images`."""
        warped: dict[int, torch.Tensor] = {}
        out = []
        for model, model_input, tap in zip(self.models, self.model_inputs, self.taps):
            x = warped.get(id(model_input))
            if x is None:
                x = model_input(images, theta)
                if self.runtime.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                warped[id(model_input)] = x
            out.append(tap(model, x) if tap is not None else (model(x), None))
        return out

    def _loss(self, latents: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        with autocast(self.runtime):
            images = self.prior.generate(latents)
            theta = self.prior.step_thetas(uniforms(keys, step, 5), self.config)
            outputs = self.outputs(images, theta)
        # The losses run in float32 outside autocast (each loss casts its inputs).
        per_model = [self.loss(logits, labels, features, prototypes, self.config.feature_weight)
                     for (logits, features), prototypes in zip(outputs, self.prototypes)]
        loss = torch.stack(per_model).mean(dim=0).sum()
        reg = self.prior.regularizer(images.float())
        return loss if reg is None else loss + reg

    def make_optimizer(self, latents: torch.Tensor) -> torch.optim.Optimizer:
        # fused Adam keeps its step counter on the device: no sync per step on CUDA.
        fused = self.runtime.device.type == "cuda"
        return torch.optim.Adam([latents], lr=self.config.lr_at(0), betas=self.config.betas, fused=fused)

    def run(
        self, latents: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor, iterations: int, on_step: Callable[[int], None] | None = None
    ) -> torch.Tensor:
        """Adam on a copy of `latents` for `iterations` steps; `on_step(step)` only counts on the host.

        The lr follows the config's MultiStep schedule (host floats, set only at a milestone: no
        sync), and the prior's latent constraint is applied after every step. `self.curve` (on the
        device) sums each step's loss, for the audit's loss-curve diagnostic. A model whose output
        does not depend on its input (a bare `.detach()` inside it) leaves no graph: the step then
        has no gradient and the latents stay where they are, as they would under any zero gradient.
        """
        if self.loss.needs_features and any(p is None for p in self.prototypes):
            raise RuntimeError(f"the {self.loss.name!r} loss needs class prototypes: set `prototypes` (InversionAttack.run does).")
        latents = latents.detach().clone().requires_grad_(True)
        optimizer = self.optimizer = self.make_optimizer(latents)
        cuts = set(self.config.milestone_steps())
        counters = torch.arange(iterations, device=latents.device)  # one upload, not one per step
        self.curve = torch.zeros(iterations, device=latents.device)
        for step in range(iterations):
            if step in cuts:
                for group in optimizer.param_groups:
                    group["lr"] = self.config.lr_at(step)
            optimizer.zero_grad(set_to_none=True)
            loss = self.forward(latents, labels, keys, counters[step])
            self.curve[step] += loss.detach().float()
            if loss.requires_grad:
                loss.backward()
            optimizer.step()
            with torch.no_grad():
                self.prior.constrain_(latents)
            if on_step is not None:
                on_step(step)
        return latents.detach()


class InversionAttack:
    """Initial selection -> optimisation -> final selection for one target model.

    `surrogates` (model, preprocessing) pairs join the target in the optimisation step only
    (LOMMA's model augmentation); initial and final selection, and with them the selection-only
    baseline, score with the target alone: the audit measures what *the target* gives away.
    """

    def __init__(self, prior: Prior, target: nn.Module, preprocessing: Preprocessing, config: AttackConfig, runtime: Runtime,
                 surrogates: Sequence[Surrogate] = ()):
        self.prior, self.config, self.runtime = prior, config.resolve(prior), runtime
        self.target = _prepare_model(target, runtime)
        classes = count_classes(self.target)
        prepared = []
        for i, (model, pre) in enumerate(surrogates):
            found = count_classes(model)
            if classes is not None and found is not None and found != classes:
                raise BadInputError(f"surrogate {i + 1} has {found} classes but the target has {classes}; distil it from this target.")
            prepared.append((_prepare_model(model, runtime), pre))
        prior.to(runtime.device, runtime.channels_last)
        self.loss_curve: list[float] = []  # the last run's mean per-image loss per step (gradient attacks)
        self.step = InversionStep(prior, self.target, preprocessing, self.config, runtime, prepared)

    @torch.no_grad()
    def scoring_logits(self, images: torch.Tensor, theta: torch.Tensor | None) -> torch.Tensor:
        """The logits selection ranks by, the target's on crops of `images`, in float32: a bf16 softmax
        has ~3 significant digits and would tie candidates."""
        with autocast(self.runtime):
            x = self.step.model_input(images, theta)
            if self.runtime.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            logits = self.target(x)
        return logits.float()

    @torch.no_grad()
    def initial_selection(self, classes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Score S pool images by target confidence (averaged with their mirror image); top C per class,
        ties (a saturated softmax) broken by the logit margin.

        The pool comes from the run's seed alone, so every rank of a sharded run sees the same pool.
        Returns class-major latents (n_classes * C, ...) and their scores (n_classes, C).
        """
        cfg, device = self.config, self.runtime.device
        rng = torch.Generator().manual_seed(cfg.seed)
        pool = self.prior.sample(cfg.samples, rng, device)
        cls = torch.tensor(classes, device=device)
        scores = torch.empty(cfg.samples, len(classes), device=device)
        margins = torch.empty(cfg.samples, len(classes), device=device)
        for part in chunks(cfg.samples, cfg.batch_size):
            with autocast(self.runtime):
                images = self.prior.generate(pool[part])
            n = images.shape[0]
            plain, mirrored = self.scoring_logits(images, None), self.scoring_logits(images, identity_thetas(n, device, flip=True))
            scores[part] = 0.5 * (plain.softmax(dim=1) + mirrored.softmax(dim=1))[:, cls]
            margins[part] = 0.5 * (class_margins(plain, cls) + class_margins(mirrored, cls))
        top = rank_descending(scores.T, margins.T)[:, : cfg.candidates]  # (n_classes, C)
        return pool[top.reshape(-1)], scores.T.gather(1, top).contiguous()

    @torch.no_grad()
    def final_statistics(self, latents: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor) -> dict[str, torch.Tensor]:
        """Over A random crops and flips (PPA's final selection) of each result, the means of: the softmax
        confidence of its class (`confidence`, PPA's score), its logit margin (`margin`, the tie-break)
        and whether the scoring model ranks the class first (`top1`, temperature-free)."""
        cfg = self.config
        with autocast(self.runtime):
            images = self.prior.generate(latents)
        n = latents.shape[0]
        totals = {name: torch.zeros(n, device=latents.device) for name in ("confidence", "margin", "top1")}
        rows = torch.arange(n, device=latents.device)
        for a in range(cfg.final_augmentations):
            theta = crop_thetas(uniforms(keys, FINAL_COUNTER_BASE + a, 5), cfg.final_scale, cfg.final_ratio, cfg.final_flip)
            logits = self.scoring_logits(images, theta)
            margin = label_margins(logits, labels)
            totals["confidence"] += logits.softmax(dim=1)[rows, labels]
            totals["margin"] += margin
            totals["top1"] += (margin > 0).float()
        return {name: total / cfg.final_augmentations for name, total in totals.items()}

    def final_scores(self, latents: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Mean target confidence of each result over A random crops and flips (what PPA reports)."""
        return self.final_statistics(latents, labels, keys)["confidence"]

    def run(self, classes: list[int], progress: ProgressFn | None = None, on_candidates: Callable | None = None) -> InversionResult:
        """`on_candidates(images, labels)`, if given, sees every optimised candidate (uint8, CPU) in
        chunks before final selection drops all but K per class (the audit's unfiltered accuracy)."""
        cfg, device = self.config, self.runtime.device
        t0 = time.perf_counter()
        latents, initial = self.initial_selection(classes)
        labels = torch.tensor(classes, device=device).repeat_interleave(cfg.candidates)
        ranks = torch.arange(cfg.candidates, device=device).repeat(len(classes))
        keys = candidate_keys(cfg.seed, labels, ranks)
        start = latents.clone() if cfg.selection_baseline else None
        if self.step.loss.needs_features:
            self.step.prototypes = self.class_prototypes(latents, classes)
        t1 = _now(device)
        total = self._optimise(latents, labels, keys, progress)
        t2 = _now(device)
        if on_candidates is not None:
            self._show_candidates(latents, labels, on_candidates)
        images, kept = self.select_final(latents, labels, keys, len(classes))
        t3 = _now(device)
        baseline = None
        if start is not None:  # same pool, same keys -> same crops: only the optimisation differs
            base_images, base_kept = self.select_final(start, labels, keys, len(classes))
            baseline = InversionResult(list(classes), base_images, base_kept["confidence"], initial.float().cpu(), 0,
                                       time.perf_counter() - t3 + (t1 - t0), final_margins=base_kept["margin"],
                                       final_top1=base_kept["top1"])  # fmt: skip
        t4 = time.perf_counter()
        return InversionResult(
            classes=list(classes),
            images=images,
            final_scores=kept["confidence"],
            initial_scores=initial.float().cpu(),
            image_steps=total,
            seconds=t3 - t0,
            timings={"initial_selection_s": t1 - t0, "optimisation_s": t2 - t1, "final_selection_s": t3 - t2, "selection_only_s": t4 - t3},
            selection_only=baseline,
            final_margins=kept["margin"],
            final_top1=kept["top1"],
            loss_curve=self.loss_curve,
        )

    @torch.no_grad()
    def class_prototypes(self, latents: torch.Tensor, classes: list[int]) -> list[torch.Tensor]:
        """Per model, LOMMA's class prototypes: row c is the mean penultimate feature, under that model,
        of class c's C initially selected candidates (uncropped), computed once before optimisation.

        LOMMA estimates its prototype from public images' features under the target; here the public
        images are the prior's, and each class gets the ones the target found most like it.
        `latents` is class-major, C per class; classes are grouped whole into batches so that no
        class's mean depends on the others.
        """
        cfg = self.config
        per_class = cfg.candidates
        tables: list[torch.Tensor | int] = [0] * len(self.step.models)
        for group in chunks(len(classes), max(1, cfg.batch_size // per_class)):
            rows = latents[group.start * per_class : group.stop * per_class]
            feats: list[list[torch.Tensor]] = [[] for _ in self.step.models]
            logits_width = [0] * len(self.step.models)
            for part in chunks(rows.shape[0], cfg.batch_size):
                with autocast(self.runtime):
                    outputs = self.step.outputs(self.prior.generate(rows[part]), None)
                for i, (logits, features) in enumerate(outputs):
                    feats[i].append(features.float())
                    logits_width[i] = logits.shape[1]
            for i, f in enumerate(feats):
                # each group fills its own classes' rows of an all-zero table: the sum is exact
                tables[i] = tables[i] + class_prototypes(torch.cat(f), classes[group], per_class, logits_width[i])
        return tables

    def _optimise(self, latents: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor, progress: ProgressFn | None) -> int:
        """Optimise `latents` in place, batch by batch; returns the image-steps done and sets `loss_curve`."""
        cfg, n = self.config, latents.shape[0]
        done, total = 0, n * cfg.iterations
        curve = torch.zeros(cfg.iterations, device=latents.device)
        self.prior.attach(self.target)
        try:
            for part in chunks(n, cfg.batch_size):
                size = part.stop - part.start
                on_step = None if progress is None else (lambda step, base=done, size=size: progress("attack", base + (step + 1) * size, total))
                latents[part] = self.step.run(latents[part], labels[part], keys[part], cfg.iterations, on_step)
                curve += self.step.curve
                done += size * cfg.iterations
        finally:
            self.prior.detach()
        self.loss_curve = (curve / max(n, 1)).tolist()  # one sync, after the loop
        return total

    @torch.no_grad()
    def _show_candidates(self, latents: torch.Tensor, labels: torch.Tensor, on_candidates: Callable) -> None:
        for part in chunks(latents.shape[0], self.config.batch_size):
            with autocast(self.runtime):
                images = self.prior.generate(latents[part])
            on_candidates(to_uint8(images).cpu(), labels[part].cpu())

    @torch.no_grad()
    def select_final(self, latents: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor, n_classes: int
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
        """Final selection: the K best of each class's candidates by mean confidence, ties by mean margin
        (`final_statistics`), rendered as uint8 (CPU), and the kept candidates' statistics, (n_classes, K) each, on the CPU."""
        cfg = self.config
        stats = {name: torch.empty(latents.shape[0], device=latents.device) for name in ("confidence", "margin", "top1")}
        for part in chunks(latents.shape[0], cfg.batch_size):
            for name, value in self.final_statistics(latents[part], labels[part], keys[part]).items():
                stats[name][part] = value
        flat, _ = select_top(stats["confidence"], n_classes, cfg.keep, tiebreak=stats["margin"])
        images = []
        for part in chunks(flat.numel(), cfg.batch_size):
            with autocast(self.runtime):
                images.append(to_uint8(self.prior.generate(latents[flat[part]])).cpu())
        kept = {name: value[flat].view(n_classes, cfg.keep).float().cpu() for name, value in stats.items()}
        return torch.cat(images).view(n_classes, cfg.keep, *images[0].shape[1:]), kept


def _prepare_model(model: nn.Module, runtime: Runtime) -> nn.Module:
    """A model the attack differentiates through but never trains: eval, frozen, on the device."""
    model = model.eval().requires_grad_(False).to(runtime.device)
    if runtime.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def _shared_input(cache: dict[tuple, ModelInput], pre: Preprocessing, device: torch.device) -> ModelInput:
    key = (tuple(pre.input_size), tuple(pre.mean), tuple(pre.std))
    if key not in cache:
        cache[key] = ModelInput(pre, device)
    return cache[key]


def rank_descending(scores: torch.Tensor, tiebreak: torch.Tensor | None = None) -> torch.Tensor:
    """Per row, the column order by `scores`, best first, equal scores by `tiebreak` (then by column).

    Two stable sorts: by the tie-break first, then by the score, so equal scores keep the
    tie-break's order and fully equal entries keep their column order on every rank.
    """
    if tiebreak is None:
        return scores.sort(dim=1, descending=True, stable=True).indices
    first = tiebreak.sort(dim=1, descending=True, stable=True).indices
    second = scores.gather(1, first).sort(dim=1, descending=True, stable=True).indices
    return first.gather(1, second)


def select_top(scores: torch.Tensor, n_classes: int, keep: int, tiebreak: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Final selection: the `keep` best of each class's candidates in class-major `scores` (ties by `tiebreak`).

    Returns flat indices into `scores` (n_classes * keep, class-major, best first) and the kept
    scores (n_classes, keep). The sorts are stable, so full ties keep pool order on every rank.
    """
    per_class = scores.view(n_classes, -1)
    order = rank_descending(per_class, None if tiebreak is None else tiebreak.view(n_classes, -1))[:, :keep]
    offsets = torch.arange(n_classes, device=scores.device)[:, None] * per_class.shape[1]
    return (order + offsets).reshape(-1), per_class.gather(1, order)


def _now(device: torch.device) -> float:
    """Wall time after the device's queued work: three syncs per run, none inside the step loop."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def out_of_memory_hint(err: BaseException, batch_size: int) -> UsageError | None:
    """The one sentence a memory error becomes (CUDA or host), or None for any other error."""
    oom = isinstance(err, torch.OutOfMemoryError) or (isinstance(err, RuntimeError) and "can't allocate memory" in str(err))
    if not oom:
        return None
    return UsageError(f"the attack ran out of memory at `batch_size` {batch_size}; rerun with a smaller `batch_size` (e.g. {max(1, batch_size // 2)}).")
