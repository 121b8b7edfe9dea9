"""The attack engine: PPA's initial selection, optimisation and final selection (docs/architecture.md §3, §4).

Speed is a feature here (docs/architecture.md §9): every step optimises one batch that mixes all target
classes (PPA runs one class per batch), under bf16 autocast and channels_last on CUDA,
optionally `torch.compile`d, and the step loop never waits for the device (no `.item()`, no
host-side random numbers: crops come from `augment.uniforms`, hashed on the device).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from mishield.attack.augment import (
    candidate_keys,
    crop_thetas,
    identity_thetas,
    uniforms,
)
from mishield.attack.inputs import ModelInput
from mishield.attack.poincare import poincare_loss
from mishield.attack.priors import Prior
from mishield.errors import UsageError
from mishield.preprocessing import Preprocessing
from mishield.runtime import Runtime, autocast

ProgressFn = Callable[[str, int, int], None]

# Counter ranges of the hashed randomness: optimisation steps use [0, I), final selection this onward.
FINAL_COUNTER_BASE = 1 << 20


@dataclass(frozen=True)
class AttackConfig:
    """S, C, I, K, A and the rest of PPA's knobs; `PRESETS` holds named defaults."""

    samples: int = 1000  # S: initial-selection pool
    candidates: int = 50  # C: kept per class for optimisation
    iterations: int = 30  # I: Adam steps
    keep: int = 20  # K: final reconstructions per class
    final_augmentations: int = 20  # A: crops scoring each candidate at final selection
    batch_size: int = 256
    seed: int = 0
    lr: float | None = None  # None: the prior's default (PPA's 0.005 for generators)
    betas: tuple[float, float] = (0.1, 0.1)
    truncation: float = 0.5
    compile: bool = False
    step_scale: tuple[float, float] = (0.9, 1.0)
    step_ratio: tuple[float, float] = (1.0, 1.0)
    final_scale: tuple[float, float] = (0.5, 0.9)
    final_ratio: tuple[float, float] = (0.8, 1.2)
    final_flip: float = 0.5

    def validate(self) -> AttackConfig:
        for name in ("samples", "candidates", "iterations", "keep", "final_augmentations", "batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"`{name}` must be at least 1, got {getattr(self, name)}.")
        if self.candidates > self.samples:
            raise UsageError(f"`candidates` ({self.candidates}) cannot exceed `samples` ({self.samples}).")
        if self.keep > self.candidates:
            raise UsageError(f"`keep` ({self.keep}) cannot exceed `candidates` ({self.candidates}).")
        return self

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# quick: a CI-sized audit; paper: PPA's FaceScrub setting (Struppek et al., 2022, Sec. 4).
PRESETS: dict[str, dict] = {
    "quick": {"samples": 1000, "candidates": 50, "iterations": 30, "keep": 20, "final_augmentations": 20},
    "paper": {"samples": 5000, "candidates": 200, "iterations": 70, "keep": 50, "final_augmentations": 100},
}


def make_config(preset: str = "quick", **overrides) -> AttackConfig:
    """A preset's values with every non-None override applied on top."""
    if preset not in PRESETS:
        raise UsageError(f"`preset` must be one of {', '.join(PRESETS)}, got {preset!r}.")
    values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    return AttackConfig(**values).validate()


@dataclass
class InversionResult:
    """What one target gave away: the K kept reconstructions of each attacked class."""

    classes: list[int]
    images: torch.Tensor  # uint8 (n_classes, K, C, H, W), CPU
    final_scores: torch.Tensor  # (n_classes, K): mean target confidence over A crops
    initial_scores: torch.Tensor  # (n_classes, C): confidence of the selected pool images
    image_steps: int
    seconds: float
    timings: dict = field(default_factory=dict)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


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
    """The attack step: latents -> prior -> random crop -> target -> Poincaré loss, then Adam.

    The loss is the sum of the per-image losses; summing (not averaging) keeps each latent's gradient
    independent of how many other images share its batch, so Adam moves it the same way in any
    batch or on any rank.
    """

    def __init__(self, prior: Prior, target: nn.Module, preprocessing: Preprocessing, config: AttackConfig, runtime: Runtime):
        self.prior, self.target, self.config, self.runtime = prior, target, config, runtime
        self.model_input = ModelInput(preprocessing, runtime.device)
        self.forward = torch.compile(self._loss) if config.compile else self._loss

    def _loss(self, latents: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        with autocast(self.runtime):
            images = self.prior.generate(latents)
            theta = crop_thetas(uniforms(keys, step, 5), self.config.step_scale, self.config.step_ratio)
            x = self.model_input(images, theta)
            if self.runtime.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            logits = self.target(x)
        loss = poincare_loss(logits, labels).sum()
        reg = self.prior.regularizer(images.float())
        return loss if reg is None else loss + reg

    def make_optimizer(self, latents: torch.Tensor) -> torch.optim.Optimizer:
        lr = self.config.lr if self.config.lr is not None else self.prior.default_lr
        # fused Adam keeps its step counter on the device: no sync per step on CUDA.
        fused = self.runtime.device.type == "cuda"
        return torch.optim.Adam([latents], lr=lr, betas=self.config.betas, fused=fused)

    def run(
        self, latents: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor, iterations: int, on_step: Callable[[int], None] | None = None
    ) -> torch.Tensor:
        """Adam on a copy of `latents` for `iterations` steps; `on_step(step)` only counts on the host."""
        latents = latents.detach().clone().requires_grad_(True)
        optimizer = self.make_optimizer(latents)
        counters = torch.arange(iterations, device=latents.device)  # one upload, not one per step
        for step in range(iterations):
            optimizer.zero_grad(set_to_none=True)
            self.forward(latents, labels, keys, counters[step]).backward()
            optimizer.step()
            if on_step is not None:
                on_step(step)
        return latents.detach()


class PPAAttack:
    """Initial selection -> optimisation -> final selection for one target model."""

    def __init__(self, prior: Prior, target: nn.Module, preprocessing: Preprocessing, config: AttackConfig, runtime: Runtime):
        self.prior, self.config, self.runtime = prior, config, runtime
        self.target = target.eval().requires_grad_(False).to(runtime.device)
        if runtime.channels_last:
            self.target.to(memory_format=torch.channels_last)
        prior.to(runtime.device, runtime.channels_last)
        self.step = InversionStep(prior, self.target, preprocessing, config, runtime)

    @torch.no_grad()
    def _probabilities(self, images: torch.Tensor, theta: torch.Tensor | None) -> torch.Tensor:
        with autocast(self.runtime):
            x = self.step.model_input(images, theta)
            if self.runtime.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return self.target(x).float().softmax(dim=1)

    @torch.no_grad()
    def initial_selection(self, classes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Score S pool images by target confidence (averaged with their mirror image); top C per class.

        The pool comes from the run's seed alone, so every rank of a sharded run sees the same pool.
        Returns class-major latents (n_classes * C, ...) and their scores (n_classes, C).
        """
        cfg, device = self.config, self.runtime.device
        rng = torch.Generator().manual_seed(cfg.seed)
        pool = self.prior.sample(cfg.samples, rng, device)
        cls = torch.tensor(classes, device=device)
        scores = torch.empty(cfg.samples, len(classes), device=device)
        for part in chunks(cfg.samples, cfg.batch_size):
            with autocast(self.runtime):
                images = self.prior.generate(pool[part])
            n = images.shape[0]
            p = self._probabilities(images, None) + self._probabilities(images, identity_thetas(n, device, flip=True))
            scores[part] = 0.5 * p[:, cls]
        top = scores.topk(cfg.candidates, dim=0)  # (C, n_classes)
        return pool[top.indices.T.reshape(-1)], top.values.T.contiguous()

    @torch.no_grad()
    def final_scores(self, latents: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Mean target confidence of each result over A random crops and flips (PPA's final selection)."""
        cfg = self.config
        with autocast(self.runtime):
            images = self.prior.generate(latents)
        total = torch.zeros(latents.shape[0], device=latents.device)
        rows = torch.arange(latents.shape[0], device=latents.device)
        for a in range(cfg.final_augmentations):
            theta = crop_thetas(uniforms(keys, FINAL_COUNTER_BASE + a, 5), cfg.final_scale, cfg.final_ratio, cfg.final_flip)
            total += self._probabilities(images, theta)[rows, labels]
        return total / cfg.final_augmentations

    def run(self, classes: list[int], progress: ProgressFn | None = None, on_candidates: Callable | None = None) -> InversionResult:
        """`on_candidates(images, labels)`, if given, sees every optimised candidate (uint8, CPU) in
        chunks before final selection drops all but K per class (the audit's unfiltered accuracy)."""
        cfg, device = self.config, self.runtime.device
        t0 = time.perf_counter()
        latents, initial = self.initial_selection(classes)
        n = latents.shape[0]
        labels = torch.tensor(classes, device=device).repeat_interleave(cfg.candidates)
        ranks = torch.arange(cfg.candidates, device=device).repeat(len(classes))
        keys = candidate_keys(cfg.seed, labels, ranks)
        t1 = _now(device)

        done, total = 0, n * cfg.iterations
        scores = torch.empty(n, device=device)
        self.prior.attach(self.target)
        try:
            for part in chunks(n, cfg.batch_size):
                size = part.stop - part.start
                on_step = None if progress is None else (lambda step, base=done, size=size: progress("attack", base + (step + 1) * size, total))
                latents[part] = self.step.run(latents[part], labels[part], keys[part], cfg.iterations, on_step)
                done += size * cfg.iterations
        finally:
            self.prior.detach()
        t2 = _now(device)
        for part in chunks(n, cfg.batch_size):
            scores[part] = self.final_scores(latents[part], labels[part], keys[part])
            if on_candidates is not None:
                with torch.no_grad(), autocast(self.runtime):
                    on_candidates(to_uint8(self.prior.generate(latents[part])).cpu(), labels[part].cpu())

        flat, kept_scores = select_top(scores, len(classes), cfg.keep)
        images = []
        with torch.no_grad():
            for part in chunks(flat.numel(), cfg.batch_size):
                with autocast(self.runtime):
                    images.append(to_uint8(self.prior.generate(latents[flat[part]])).cpu())
        images_t = torch.cat(images).view(len(classes), cfg.keep, *images[0].shape[1:])
        t3 = time.perf_counter()
        return InversionResult(
            classes=list(classes),
            images=images_t,
            final_scores=kept_scores.float().cpu(),
            initial_scores=initial.float().cpu(),
            image_steps=total,
            seconds=t3 - t0,
            timings={"initial_selection_s": t1 - t0, "optimisation_s": t2 - t1, "final_selection_s": t3 - t2},
        )


def select_top(scores: torch.Tensor, n_classes: int, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Final selection: the `keep` best of each class's candidates in class-major `scores`.

    Returns flat indices into `scores` (n_classes * keep, class-major, best first) and the kept
    scores (n_classes, keep). The sort is stable, so ties keep pool order on every rank.
    """
    per_class = scores.view(n_classes, -1)
    order = per_class.sort(dim=1, descending=True, stable=True)
    offsets = torch.arange(n_classes, device=scores.device)[:, None] * per_class.shape[1]
    return (order.indices[:, :keep] + offsets).reshape(-1), order.values[:, :keep]


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
