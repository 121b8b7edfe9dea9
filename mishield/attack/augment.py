"""Per-sample random resized crops as one differentiable `grid_sample`, driven by counter-based randomness.

PPA augments every optimisation step with RandomResizedCrop and scores the final candidates
under 100 more random crops. Two choices here make the attack fast and reproducible:

* A crop plus the resize to the target's input size is one affine warp, so a whole batch of
  differently-cropped images is a single `affine_grid` + `grid_sample` call on the device.
* The random numbers come from hashing (seed, class, candidate, step, stream) with integer
  arithmetic on the device instead of from a stateful generator. No host round trip, and a
  candidate gets the same crops whichever batch, process or GPU it lands in, which is what lets
  a sharded multi-GPU audit reproduce the single-process result exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_M32 = 0xFFFFFFFF
_MULT = 0x45D9F3B  # < 2**27, so (x < 2**32) * _MULT never overflows int64 on any backend


def mix32(x: torch.Tensor | int) -> torch.Tensor | int:
    """A 32-bit avalanche hash (three xor-shift-multiply rounds) on int64 tensors or ints."""
    x = x & _M32
    x = ((x ^ (x >> 16)) * _MULT) & _M32
    x = ((x ^ (x >> 16)) * _MULT) & _M32
    return x ^ (x >> 16)


def candidate_keys(seed: int, classes: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """One hash key per candidate, from the run's seed, its target class and its rank within the class."""
    base = mix32(mix32(int(seed)) ^ 0x9E3779B9)
    return mix32(mix32(classes.long() ^ base) ^ (indices.long() * 0x2545F49 & _M32))


def uniforms(keys: torch.Tensor, counter: int | torch.Tensor, count: int) -> torch.Tensor:
    """`count` uniforms in [0, 1) per key for one counter value (step or augmentation index): (N, count).

    The counter may be a 0-d device tensor: a compiled step then sees one graph for every step
    instead of specialising on each Python int.
    """
    salt = mix32(counter * 0x632BE5AB & _M32)
    lanes = torch.arange(count, device=keys.device, dtype=torch.long)
    h = mix32(mix32(keys[:, None] ^ salt) ^ (lanes[None, :] * 0x27D4EB2F & _M32))
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def crop_thetas(
    u: torch.Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    flip_p: float = 0.0,
) -> torch.Tensor:
    """Affine matrices (N, 2, 3) for RandomResizedCrop(scale, ratio) and a horizontal flip, from u (N, 5).

    The crop covers a fraction `s` of the image area with aspect `r` (log-uniform, as torchvision
    draws it) at a uniform position; where torchvision would retry an oversize crop, this clamps.
    """
    s = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    r = torch.exp(log_r)
    w = torch.sqrt(s * r).clamp(max=1.0)
    h = torch.sqrt(s / r).clamp(max=1.0)
    cx = (1.0 - w) * (2.0 * u[:, 2] - 1.0)
    cy = (1.0 - h) * (2.0 * u[:, 3] - 1.0)
    flip = torch.where(u[:, 4] < flip_p, -1.0, 1.0)
    zero = torch.zeros_like(s)
    return torch.stack([torch.stack([w * flip, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)


def jitter_thetas(u: torch.Tensor, max_shift: float, flip_p: float = 0.0) -> torch.Tensor:
    """Affine matrices (N, 2, 3) for a random shift of up to `max_shift` of a side and a flip, from u (N, 5).

    DeepInversion's per-step augmentation (it rolls the image by up to a few pixels); the warp's
    reflection padding fills the uncovered border where a roll would wrap around.
    """
    tx = 2.0 * max_shift * (2.0 * u[:, 2] - 1.0)  # affine coordinates span 2 per side
    ty = 2.0 * max_shift * (2.0 * u[:, 3] - 1.0)
    flip = torch.where(u[:, 4] < flip_p, -1.0, 1.0)
    one, zero = torch.ones_like(tx), torch.zeros_like(tx)
    return torch.stack([torch.stack([flip, zero, tx], 1), torch.stack([zero, one, ty], 1)], 1)


def identity_thetas(n: int, device: torch.device | str, flip: bool = False) -> torch.Tensor:
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0] = -1.0 if flip else 1.0
    theta[:, 1, 1] = 1.0
    return theta


def warp(images: torch.Tensor, theta: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crop-and-resize every image by its own affine matrix to `size` (H, W), bilinear and differentiable."""
    theta = theta.to(images.dtype)
    grid = F.affine_grid(theta, [images.shape[0], images.shape[1], *size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
