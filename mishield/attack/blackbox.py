"""A gradient-free inversion attack: PPA's selection around an evolution strategy that only queries the target.

Every other attack of the audit follows gradients through the target, so a "defence" that only
breaks those gradients (a detached or rounded input, saturated logits) looks like a defence.
`BlackBoxAttack` keeps PPA's initial selection and final selection exactly as they are (same pool,
same candidates, same keys, same final crops, same selection-only baseline: it subclasses
`InversionAttack` and replaces only the optimisation phase) and optimises each candidate's latent with
the target's *outputs* alone:

* mode `scores`: the target's class probabilities (read in float32 at full precision);
* mode `labels`: the target's top-1 label alone.

The search: NES with antithetic sampling and rank-based fitness shaping
-----------------------------------------------------------------------
Per candidate z and generation: P/2 Gaussian directions e_k, the population
z + sigma s * e_k and z - sigma s * e_k (s: the prior's per-coordinate spread, so `sigma` and
`lr` mean the same in any latent space), one target pass over the whole population of every
candidate of every class, fitness f_i, centred ranks u_i in [-1/2, 1/2] (ties averaged), the
search-gradient estimate g = sum_k (u_k+ - u_k-) e_k / (P sigma), and an Adam step of
`lr * s` per coordinate along g (Salimans et al. 2017, "Evolution Strategies as a Scalable
Alternative to Reinforcement Learning"; Ilyas et al., ICML 2018, for NES in black-box attacks).
The prior's latent constraint (`Prior.constrain_`) holds for every queried point and every update.

Why this strategy and not a genetic algorithm or CMA-ES, per query:

* The attack has C candidates per class that must stay *those* candidates (final selection and the
  selection-only baseline compare the same latents). NES keeps one search distribution per
  candidate; Mirror's (mu, lambda) GA (An et al., NDSS 2022) recombines a class's population and
  loses that identity, and spends its queries on the population as a whole.
* Antithetic pairs cancel the even part of the fitness around z (a population of P estimates the
  slope as well as 2P independent samples on a locally quadratic fitness), and Adam's moments
  average the estimate over generations, which is where most of the per-query efficiency of
  NES-based black-box attacks comes from. A diagonal CMA-ES adapts the same per-coordinate scale
  that Adam's second moment does, but needs populations of ~4 + 3 ln(d) *per candidate* to
  estimate it; on a 64-d z that is 16, twice the default population, for an adaptation that Adam's
  second moment already makes.
* Rank shaping makes the update invariant to any monotone change of the fitness. Together with
  the score fitness below, a temperature the owner puts on the logits (x1e3, x1e-3) leaves the
  ranks, and therefore the whole search, unchanged.
* Every candidate of a generation sees the same crop at all its population members (common
  random numbers): the ranks compare latents, not crops, so the crop noise that PPA's step
  averages over time does not enter the ranking at all.

The fitness
-----------
* `scores`: the log-probability margin log p_y - max_{j != y} log p_j (the black-box objective of
  ZOO, Chen et al., AISec 2017) of the candidate's crop, averaged over the generation's crops. A
  margin of log-probabilities equals the logit margin times whatever temperature the owner set,
  so its ranks do not depend on the temperature; log p_y alone would rank differently at x1e3
  (where it is the margin) than at x1e-3 (where it is z_y minus the mean logit). Probabilities
  are taken at full float32 precision from the logits: the threat model is white-box, so the
  attacker who chooses to query only outputs still reads them unrounded.
* `labels`: the fraction of the generation's R crops (the attack's own step crops,
  `Prior.step_thetas`) that the target labels as the attacked class. Ranks of a binary or R-level
  fitness are mostly ties; tied members cancel, so the update moves away from the members that
  left the class and towards those that stayed (BREP-MI's boundary repulsion, Kahla et al.,
  CVPR 2022). When the whole population of a candidate stayed in the class there is no signal
  at that radius, and, as BREP-MI grows its sphere, that candidate's sigma grows by
  `label_growth` (up to `label_max_growth`) so the search finds the boundary again further out
  and keeps pushing the latent towards the inside of the class region.

Only the optimisation is gradient- and (in `labels` mode) score-free: initial and final
selection are the engine's, unchanged, and rank by the target's logit margins, as they must for
the result to be comparable with PPA and its selection-only baseline. A fully label-only attacker
would also have to select by labels.

Budget: every queried image counts once (a forward pass of generator and target, no backward).
Optimisation costs `generations x population x crops` queries per candidate (`queries_per_candidate`);
PPA's step costs `iterations` forward+backward passes (one crop each). `generations` defaults to
half the audit's I (`BlackBoxConfig.resolve`): at the z-space default of 100 steps, 50 x 8 x 1 =
400 queries in `scores` mode, 4x PPA's 100 steps in count; a query cost 1/1.6 of a
gradient step with ResNet-18 on a 2-core CPU (bench/blackbox_throughput.py, docs/BENCHMARKS.md),
so about 2.5x PPA's time there, and less where a backward pass costs its usual ~2 forward passes.
`labels` mode reads 4 crops per member (1,600 queries): a binary answer carries less per query. Everything runs under `torch.no_grad()`, one generator pass + one target
pass per chunk of `query_batch` images with every class mixed, randomness hashed on the device
per candidate (`mishield.attack.augment`), no host sync in the generation loop, so a sharded run
reproduces the single-process one and the loop runs on a GPU at forward-pass speed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

import torch
from torch import nn

from mishield.attack.augment import uniforms
from mishield.attack.config import BLACKBOX_MODES as MODES
from mishield.attack.config import AttackConfig, BlackBoxConfig
from mishield.attack.engine import (
    InversionAttack,
    InversionResult,
    ProgressFn,
    chunks,
    label_margins,
)
from mishield.attack.priors import Prior
from mishield.preprocessing import Preprocessing
from mishield.runtime import Runtime, autocast

__all__ = ["MODES", "BlackBoxAttack", "BlackBoxConfig", "BlackBoxResult", "EvolutionSearch", "centred_ranks", "gaussian",
           "label_fitness", "score_fitness"]  # fmt: skip
# Counter ranges of the hashed randomness (PPA's step crops use [0, I), final selection
# FINAL_COUNTER_BASE onward): crops of generation g use g * R + r, below FINAL_COUNTER_BASE, and
# the search directions of generation g use NOISE_COUNTER_BASE + g, so no two streams share a counter.
NOISE_COUNTER_BASE = 1 << 21
SCALE_SEED_SALT = 0x5CA1E  # the per-coordinate spread is measured on its own draw, not on the pool
SCALE_SAMPLES = 1024


@dataclass
class BlackBoxResult(InversionResult):
    """An `InversionResult` (the audit reads it unchanged) plus what the attack cost in target queries.

    `image_steps` holds the optimisation's queries (each a forward pass, not a forward+backward
    step as for PPA); `queries` breaks the whole run down by phase.
    """

    queries: dict = field(default_factory=dict)
    blackbox: dict = field(default_factory=dict)  # the BlackBoxConfig that ran


def centred_ranks(fitness: torch.Tensor) -> torch.Tensor:
    """Per row, each entry's rank among the row (ties averaged) mapped to [-1/2, 1/2]; rows sum to 0.

    Salimans et al.'s fitness shaping: only the order of the fitness values matters. A row of
    equal values gets all zeros (no information, no update). O(P^2) per row by comparison, which
    for populations of tens is one small batched kernel and needs no sort.
    """
    p = fitness.shape[-1]
    below = (fitness[..., None, :] < fitness[..., :, None]).sum(-1)
    equal = (fitness[..., None, :] == fitness[..., :, None]).sum(-1)
    rank = below.to(torch.float32) + 0.5 * (equal - 1).to(torch.float32)
    return rank / (p - 1) - 0.5


def gaussian(keys: torch.Tensor, counter: int | torch.Tensor, count: int) -> torch.Tensor:
    """`count` standard normals per key from the hashed uniforms (Box-Muller): (N, count), on the keys' device."""
    pairs = (count + 1) // 2
    u = uniforms(keys, counter, 2 * pairs)
    radius = torch.sqrt(-2.0 * torch.log1p(-u[:, :pairs]))  # 1 - u lies in (0, 1]: no log(0)
    angle = (2.0 * math.pi) * u[:, pairs:]
    return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)[:, :count]


def score_fitness(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p_y - max_{j != y} log p_j per query, in float32: the temperature-free order of the scores.

    The softmax's normaliser cancels in the difference, so it is computed as the same difference
    of logits: log_softmax would first add and then subtract a log-sum-exp, whose rounding (~1e-7
    of it) can swap two members whose margins differ by less, and the search would fork. The
    engine's selection ranks by the same margin (`mishield.attack.engine.label_margins`).
    """
    return label_margins(logits, labels)


def label_fitness(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """1 where the target's top-1 label is the attacked class, else 0: all a label-only API says."""
    return (logits.argmax(dim=1) == labels).to(torch.float32)


FITNESS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"scores": score_fitness, "labels": label_fitness}


class EvolutionSearch:
    """The optimisation phase: NES on each candidate's latent against the target's outputs only.

    `query(images, theta)` is the target's output (logits) on crops of prior images; the search
    reads it only through `FITNESS[mode]`.
    """

    def __init__(self, prior: Prior, query: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], config: AttackConfig,
                 blackbox: BlackBoxConfig, runtime: Runtime):
        self.prior, self.query, self.config, self.blackbox, self.runtime = prior, query, config, blackbox.resolve(config), runtime
        self.fitness_of = FITNESS[self.blackbox.mode]
        self.dim = math.prod(prior.latent_shape)
        self.scale = self._spread()  # (dim,) the prior's per-coordinate spread
        self.evaluate = torch.compile(self._evaluate) if config.compile else self._evaluate
        self.sigma: torch.Tensor | None = None  # the last run's final per-candidate radii, for inspection

    @torch.no_grad()
    def _spread(self) -> torch.Tensor:
        """The per-coordinate standard deviation of the prior's own samples (its own seeded draw):
        z-space gives ~1 everywhere, a StyleGAN's w its anisotropic spread, pixels 0.5."""
        rng = torch.Generator().manual_seed(self.config.seed ^ SCALE_SEED_SALT)
        draw = self.prior.sample(SCALE_SAMPLES, rng, self.runtime.device).float().flatten(1)
        std = draw.std(dim=0)
        return std.clamp_min(1e-3 * float(std.mean()) + 1e-12)

    def population(self, latents: torch.Tensor, keys: torch.Tensor, generation: torch.Tensor, sigma: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """The antithetic population of each latent (n, P, dim), constrained, and its directions (n, P/2, dim)."""
        n, half = latents.shape[0], self.blackbox.population // 2
        directions = gaussian(keys, NOISE_COUNTER_BASE + generation, half * self.dim).view(n, half, self.dim)
        step = (sigma[:, None, None] * self.scale) * directions
        centre = latents.reshape(n, 1, self.dim)
        points = torch.cat([centre + step, centre - step], dim=1)
        shaped = points.view(n * 2 * half, *self.prior.latent_shape)
        self.prior.constrain_(shaped)
        return points, directions

    def _evaluate(self, points: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor, generation: torch.Tensor) -> torch.Tensor:
        """Fitness (n, P) of every point: one generator pass and one target pass over all crops."""
        n, p = points.shape[:2]
        crops = self.blackbox.crops_per_member
        with autocast(self.runtime):
            images = self.prior.generate(points.reshape(n * p, *self.prior.latent_shape))
        # The generation's crops, one set per candidate, shared by its whole population (common random numbers).
        counters = generation * crops + torch.arange(crops, device=keys.device)
        thetas = torch.stack([self.prior.step_thetas(uniforms(keys, c, 5), self.config) for c in counters.unbind()], dim=1)
        thetas = thetas[:, None].expand(n, p, crops, 2, 3).reshape(n * p * crops, 2, 3)
        images = images[:, None].expand(n * p, crops, *images.shape[1:]).reshape(n * p * crops, *images.shape[1:])
        member_labels = labels[:, None].expand(n, p * crops).reshape(-1)
        with autocast(self.runtime):
            logits = self.query(images, thetas)
        return self.fitness_of(logits, member_labels).view(n, p, crops).mean(dim=2)

    def estimate(self, fitness: torch.Tensor, directions: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """NES's search gradient (n, dim) in the prior's spread units, from rank-shaped fitness."""
        u = centred_ranks(fitness)
        half = directions.shape[1]
        weights = u[:, :half] - u[:, half:]  # antithetic pairs: (+e, -e)
        return torch.einsum("nk,nkd->nd", weights, directions) / (self.blackbox.population * sigma[:, None])

    @torch.no_grad()
    def run(self, latents: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor, on_generation: Callable[[int], None] | None = None
            ) -> torch.Tensor:
        """NES on a copy of `latents` (n, *latent_shape) for `generations`; `on_generation(g)` only counts on the host."""
        bb = self.blackbox
        n = latents.shape[0]
        z = latents.detach().clone().float().reshape(n, self.dim)
        m, v = torch.zeros_like(z), torch.zeros_like(z)
        sigma = torch.full((n,), bb.sigma, device=z.device)
        counters = torch.arange(bb.generations, device=z.device)  # one upload, not one per generation
        for g in range(bb.generations):
            points, directions = self.population(z, keys, counters[g], sigma)
            fitness = self.evaluate(points, labels, keys, counters[g])
            grad = self.estimate(fitness, directions, sigma)
            m.mul_(bb.betas[0]).add_(grad, alpha=1 - bb.betas[0])
            v.mul_(bb.betas[1]).addcmul_(grad, grad, value=1 - bb.betas[1])
            m_hat, v_hat = m / (1 - bb.betas[0] ** (g + 1)), v / (1 - bb.betas[1] ** (g + 1))
            z.add_(self.scale * m_hat / (v_hat.sqrt() + 1e-8), alpha=bb.lr)
            self.prior.constrain_(z.view(n, *self.prior.latent_shape))
            if bb.mode == "labels":  # BREP-MI's growing sphere where no member left the class
                stayed = (fitness >= 1.0).all(dim=1)
                sigma = torch.where(stayed, (sigma * bb.label_growth).clamp(max=bb.sigma * bb.label_max_growth), sigma)
            if on_generation is not None:
                on_generation(g)
        self.sigma = sigma
        return z.view(n, *self.prior.latent_shape).to(latents.dtype)


class BlackBoxAttack(InversionAttack):
    """PPA's initial selection -> `EvolutionSearch` (target outputs only) -> PPA's final selection.

        result = BlackBoxAttack(prior, target, preprocessing, make_config("ci"), runtime,
                                BlackBoxConfig(mode="labels")).run(classes)

    `result` is a `BlackBoxResult` (an `InversionResult`) with the same selection-only baseline as
    PPA's at the same config: the pool, candidates, keys and final crops do not depend on the
    optimiser.
    """

    def __init__(self, prior: Prior, target: nn.Module, preprocessing: Preprocessing, config: AttackConfig, runtime: Runtime,
                 blackbox: BlackBoxConfig | None = None):
        # The identity loss is never evaluated here; a feature loss would only make the engine tap
        # features and build prototypes that a black-box attacker has no access to.
        if config.loss != "poincare":
            config = replace(config, loss="poincare", feature_weight=None).validate()
        super().__init__(prior, target, preprocessing, config, runtime)
        self.blackbox = (blackbox or BlackBoxConfig()).resolve(self.config)
        self.search = EvolutionSearch(self.prior, self._logits, self.config, self.blackbox, runtime)

    def _logits(self, images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """The target's output on crops of `images`: the only thing the search ever reads of the target."""
        x = self.step.model_input(images, theta)
        if self.runtime.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.target(x)

    def candidates_per_pass(self) -> int:
        """How many candidates' populations share one generator + target pass."""
        bb = self.blackbox
        images = bb.query_batch if bb.query_batch is not None else 4 * self.config.batch_size
        return max(1, images // (bb.population * bb.crops_per_member))

    def _optimise(self, latents: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor, progress: ProgressFn | None) -> int:
        """Replaces PPA's gradient phase: optimise `latents` in place; returns the target queries spent."""
        n, per = latents.shape[0], self.blackbox.queries_per_candidate
        total, done = n * per, 0
        for part in chunks(n, self.candidates_per_pass()):
            size = part.stop - part.start
            step = size * self.blackbox.population * self.blackbox.crops_per_member
            on_gen = None if progress is None else (lambda g, base=done, step=step: progress("attack", base + (g + 1) * step, total))
            latents[part] = self.search.run(latents[part], labels[part], keys[part], on_gen)
            done += size * per
        return total

    def run(self, classes: list[int], progress: ProgressFn | None = None, on_candidates: Callable | None = None) -> BlackBoxResult:
        result = super().run(classes, progress, on_candidates)
        cfg, n = self.config, len(classes) * self.config.candidates
        final = n * cfg.final_augmentations
        queries = {
            "initial_selection": 2 * cfg.samples,  # each pool image and its mirror
            "optimisation": result.image_steps,
            "final_selection": final,
            "selection_only": final if result.selection_only is not None else 0,
            "per_candidate": self.blackbox.queries_per_candidate,
            "candidates": n,
        }
        queries["total"] = queries["initial_selection"] + queries["optimisation"] + queries["final_selection"] + queries["selection_only"]
        common = {f.name: getattr(result, f.name) for f in fields(InversionResult)}
        return BlackBoxResult(**common, queries=queries, blackbox=self.blackbox.to_dict())
