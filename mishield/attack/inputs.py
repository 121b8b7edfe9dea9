"""How prior images in [-1, 1] become a classifier's input: crop/resize, channel count, mean/std.

Everything is one differentiable chain of tensor ops, so gradients reach the latents, and the
target sees exactly the contract it was trained with (`Preprocessing`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mishield.attack.augment import warp
from mishield.errors import BadInputError
from mishield.preprocessing import Preprocessing

# ITU-R BT.601 luma, the weights PIL uses for convert("L"): a colour prior feeding a grey model.
_LUMA = (0.299, 0.587, 0.114)


def adapt_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    have = images.shape[1]
    if have == channels:
        return images
    if have == 1:
        return images.expand(-1, channels, -1, -1)
    if have == 3 and channels == 1:
        w = images.new_tensor(_LUMA).view(1, 3, 1, 1)
        return (images * w).sum(dim=1, keepdim=True)
    raise BadInputError(
        f"the prior makes {have}-channel images but the model expects {channels} channels; "
        "use a prior with 1 or 3 channels."
    )


class ModelInput:
    """Maps images in [-1, 1] (N, C, h, w) to normalised model input (N, C', H, W)."""

    def __init__(self, preprocessing: Preprocessing, device: torch.device | str = "cpu"):
        channels, height, width = (int(v) for v in preprocessing.input_size)
        mean, std = list(preprocessing.mean), list(preprocessing.std)
        if len(mean) != channels:  # statistics recorded for another channel count: mishield.data does the same
            mean, std = [sum(mean) / len(mean)] * channels, [sum(std) / len(std)] * channels
        self.channels = channels
        self.size = (height, width)
        # ((x + 1) / 2 - mean) / std folded into one multiply-add.
        std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.scale = 0.5 / std_t
        self.shift = (0.5 - mean_t) / std_t

    def __call__(self, images: torch.Tensor, theta: torch.Tensor | None = None) -> torch.Tensor:
        """With `theta` (N, 2, 3) a per-image crop warp; without, a plain antialiased resize.

        A prior image larger than the model input is first resized to it with antialiasing (as the
        evaluator's resize and PPA's Resize before RandomResizedCrop do): bilinear sampling alone
        would skip pixels when it downsamples, and the target would see aliased images.
        """
        if theta is not None:
            if images.shape[-2] > self.size[0] or images.shape[-1] > self.size[1]:
                images = F.interpolate(images, size=self.size, mode="bilinear", align_corners=False, antialias=True)
            x = warp(images, theta, self.size)
        elif tuple(images.shape[-2:]) != self.size:
            x = F.interpolate(images, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        else:
            x = images
        x = adapt_channels(x, self.channels)
        return x * self.scale.to(x.dtype) + self.shift.to(x.dtype)
