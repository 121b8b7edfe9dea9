"""Image priors the attacker optimises through.

A prior turns latents into images in [-1, 1]. Four kinds plug into the same attack:

* `GeneratorPrior`: any generator mapping z ~ N(0, I) to images, mishield's own DCGAN-like
  generator (`mishield.models.dcgan`, trained on public data by
  `mishield.training.prior.train_prior`) being the default;
* `StyleGANPrior`: generators with `mapping` and `synthesis` (StyleGAN2-ADA's layout); the
  attack optimises w, drawn with truncation psi = 0.5 at initial selection as PPA does;
* `PixelPrior` (`--prior none`): the latents are the pixels, regularised DeepInversion-style by
  matching the target's BatchNorm statistics and by total variation.
"""

from __future__ import annotations

import inspect
import math
import pickle
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from mishield.attack.augment import crop_thetas, jitter_thetas
from mishield.errors import BadInputError, first_line
from mishield.models.dcgan import (
    DCGANGenerator,
    load_generator_file,
    save_generator,
)
from mishield.models.filechecks import refuse_program

# mishield's own generator and its file are used with the priors; importable from here too.
__all__ = [
    "DCGANGenerator",
    "GeneratorPrior",
    "PixelPrior",
    "Prior",
    "StyleGANPrior",
    "load_generator_file",
    "load_prior",
    "save_generator",
]

LATENT_ATTRS = ("z_dim", "latent_dim", "nz")
# Latents are drawn before the generator's output is checked: a generator claiming a larger size is
# refused before it allocates (StyleGAN uses 512, DCGANs 100-512).
MAX_LATENT_DIM = 4096



# ---------------------------------------------------------------------------------------------
# The priors


# Attack budgets per latent space (docs/audit.md, "Budgets"). Every `AttackConfig` field left at
# None is taken from here by `AttackConfig.resolve(prior)`.
#
# z-space (mishield's DCGAN, any generator of z ~ N(0, I)): chosen from the measured calibration
# curve (bench/audit_calibration.py, docs/audit.md): at lr 0.005 the target's confidence on the
# kept images needs ~100 steps to plateau, at lr 0.05 it plateaus within 10-30 steps and falls
# back by 300 steps without a schedule, so lr 0.05 for 100 steps with PPA's x0.1 cuts at 60 %
# and 80 % of the run (PPA's FaceScrub config cuts at steps 30 and 40 of 50). Betas made no
# consistent difference in the curve; PPA's (0.1, 0.1) are kept.
Z_SPACE_BUDGET = {"lr": 0.05, "iterations": 100, "betas": (0.1, 0.1), "milestones": (0.6, 0.8), "gamma": 0.1}
# w-space (StyleGAN): PPA's own (configs/attacking/default_attacking_local.yaml, FaceScrub):
# Adam lr 0.005, betas (0.1, 0.1), 50 steps, MultiStepLR milestones [30, 40], gamma 0.1.
W_SPACE_BUDGET = {"lr": 0.005, "iterations": 50, "betas": (0.1, 0.1), "milestones": (0.6, 0.8), "gamma": 0.1}
# Generator-free pixels: DeepInversion (Yin et al., CVPR 2020) synthesises with 2k Adam steps
# (its ImageNet setting; betas (0.5, 0.9) there, lr decayed over the run). At mishield's small
# resolutions lr 0.05 on tanh-pixels; the decay is approximated by x0.1 cuts at 50 % and 75 %.
PIXEL_BUDGET = {"lr": 0.05, "iterations": 2000, "betas": (0.5, 0.9), "milestones": (0.5, 0.75), "gamma": 0.1}

# GMI (Zhang et al., CVPR 2020) and KEDMI (Chen et al., ICCV 2021) clamp every coordinate of z
# after each step so the latent stays where the generator was trained. Their bound is 1; ours is 3
# because mishield's pool is drawn from N(0, I) and a bound of 1 would move about a third of the
# coordinates of every selected candidate on the first step, away from the image that won the
# initial selection. |z_i| <= 3 holds 99.7 % of the generator's training latents and stops the
# drift into regions it never saw (norms stay <= 3 sqrt(dim)).
Z_LATENT_CLAMP = 3.0
# PPA crops StyleGAN's 1024 px FFHQ faces to the central 800 px before resizing
# (configs/attacking/*.yaml, CenterCrop size 800): the face region, without the background.
STYLEGAN_CENTER_CROP = 800 / 1024
HIGH_RESOLUTION = 512  # from this output side on, a StyleGAN prior is cropped by default


def center_crop_size(size: tuple[int, int], fraction: float) -> tuple[int, int]:
    return (max(1, round(size[0] * fraction)), max(1, round(size[1] * fraction)))


def center_crop(images: torch.Tensor, fraction: float | None) -> torch.Tensor:
    """The central `fraction` of each side (PPA's CenterCrop for high-resolution priors); None or 1: as is."""
    if fraction is None or fraction >= 1.0:
        return images
    h, w = images.shape[-2:]
    ch, cw = center_crop_size((h, w), fraction)
    top, left = (h - ch) // 2, (w - cw) // 2
    return images[..., top : top + ch, left : left + cw]


class Prior:
    """Latents -> images in [-1, 1]; `sample` draws the initial-selection pool."""

    kind = "prior"
    budget = Z_SPACE_BUDGET  # the attack's defaults for this latent space (see above)
    latent_clamp: float | None = Z_LATENT_CLAMP  # applied after every optimiser step; None: unconstrained
    center_crop: float | None = None  # fraction of each side kept before the target sees the image

    @property
    def default_lr(self) -> float:
        return self.budget["lr"]

    def constrain_(self, latents: torch.Tensor) -> None:
        """Keep optimised latents where the prior is meaningful (in place, no autograd)."""
        if self.latent_clamp is not None:
            latents.clamp_(-self.latent_clamp, self.latent_clamp)

    def step_thetas(self, u: torch.Tensor, config) -> torch.Tensor:
        """The per-step augmentation as affine matrices from u (N, 5): PPA's RandomResizedCrop."""
        return crop_thetas(u, config.step_scale, config.step_ratio)

    def __init__(self, image_shape: tuple[int, int, int], latent_shape: tuple[int, ...], description: dict):
        self.image_shape = image_shape
        self.latent_shape = latent_shape
        self.description = description

    def modules(self) -> list[nn.Module]:
        return []

    def to(self, device: torch.device, channels_last: bool = False) -> Prior:
        for m in self.modules():
            m.to(device)
            if channels_last:
                m.to(memory_format=torch.channels_last)
        return self

    def sample(self, n: int, rng: torch.Generator, device: torch.device) -> torch.Tensor:
        return torch.randn(n, *self.latent_shape, generator=rng).to(device)

    def generate(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # Hooks for priors that regularise through the target (the BatchNorm-statistics prior).
    def attach(self, target: nn.Module) -> None:
        pass

    def detach(self) -> None:
        pass

    def regularizer(self, images: torch.Tensor) -> torch.Tensor | None:
        return None

    def describe(self) -> dict:
        return {"kind": self.kind, "image_shape": list(self.image_shape), "latent_shape": list(self.latent_shape), **self.description}


class GeneratorPrior(Prior):
    kind = "generator"

    def __init__(self, generator: nn.Module, latent_dim: int, description: dict, center_crop: float | None = None):
        self.generator = generator.eval().requires_grad_(False)
        self.center_crop = center_crop
        shape = _probe_output(self.generate, torch.randn(2, latent_dim), description.get("source", "the prior"), _device_of(generator))
        super().__init__(shape, (latent_dim,), {**description, "center_crop": center_crop})

    def modules(self) -> list[nn.Module]:
        return [self.generator]

    def generate(self, latents: torch.Tensor) -> torch.Tensor:
        return center_crop(self.generator(latents), self.center_crop)


class StyleGANPrior(Prior):
    """Optimises one w per image (broadcast to all synthesis layers), as PPA does."""

    kind = "stylegan"
    budget = W_SPACE_BUDGET
    latent_clamp = None  # PPA leaves w unconstrained; truncated sampling already starts it near w_avg

    def __init__(self, generator: nn.Module, truncation: float, description: dict, center_crop: float | None = None):
        """`center_crop` None: PPA's 800/1024 for outputs of at least 512 px (full-frame faces), else none."""
        self.generator = generator.eval().requires_grad_(False)
        self.truncation = truncation
        self.center_crop = center_crop
        self.z_dim = _latent_dim(generator, description.get("source", "the prior"))
        self.c_dim = int(getattr(generator, "c_dim", 0) or 0)
        self._w_avg: torch.Tensor | None = None
        device = _device_of(generator)
        with torch.no_grad():
            w = self._map(torch.randn(2, self.z_dim, device=device))
        self.num_ws = w.shape[1] if w.dim() == 3 else None
        w_dim = w.shape[-1]
        shape = _probe_output(self.generate, self._first_w(w), description.get("source", "the prior"), device)
        if center_crop is None and min(shape[1:]) >= HIGH_RESOLUTION:
            self.center_crop = STYLEGAN_CENTER_CROP
            shape = (shape[0], *center_crop_size(shape[1:], self.center_crop))
        center_crop = self.center_crop
        super().__init__(shape, (w_dim,), {**description, "truncation": truncation, "center_crop": center_crop})

    def modules(self) -> list[nn.Module]:
        return [self.generator]

    def _map(self, z: torch.Tensor, psi: float = 1.0) -> torch.Tensor:
        mapping = self.generator.mapping
        c = torch.zeros(z.shape[0], self.c_dim, device=z.device) if self.c_dim else None
        params = inspect.signature(mapping.forward).parameters
        if "truncation_psi" in params:
            return mapping(z, c, truncation_psi=psi) if "c" in params else mapping(z, truncation_psi=psi)
        w = mapping(z, c) if "c" in params else mapping(z)
        if psi != 1.0:
            w_avg = getattr(mapping, "w_avg", None)
            if w_avg is None:
                if self._w_avg is None:  # estimate the centre of W once, from 4096 samples
                    gen = torch.Generator().manual_seed(0)
                    zs = torch.randn(4096, self.z_dim, generator=gen).to(z.device)
                    self._w_avg = (mapping(zs, c[:1].expand(4096, -1)) if "c" in params else mapping(zs)).mean(0)
                w_avg = self._w_avg
            w = w_avg + psi * (w - w_avg)
        return w

    @staticmethod
    def _first_w(w: torch.Tensor) -> torch.Tensor:
        return w[:, 0] if w.dim() == 3 else w

    def sample(self, n: int, rng: torch.Generator, device: torch.device) -> torch.Tensor:
        z = torch.randn(n, self.z_dim, generator=rng).to(device)
        with torch.no_grad():
            return self._first_w(self._map(z, self.truncation)).float()

    def generate(self, latents: torch.Tensor) -> torch.Tensor:
        synthesis = self.generator.synthesis
        ws = latents[:, None, :].expand(-1, self.num_ws, -1) if self.num_ws else latents
        params = inspect.signature(synthesis.forward).parameters
        if "noise_mode" in params:  # StyleGAN2-ADA: fixed noise keeps the image a function of w alone
            return center_crop(synthesis(ws, noise_mode="const"), self.center_crop)
        return center_crop(synthesis(ws), self.center_crop)


class PixelPrior(Prior):
    """Generator-free: optimise pixels (through tanh, so they stay in [-1, 1]), DeepInversion-style.

    DeepInversion (Yin et al., CVPR 2020) makes such images natural for the target by matching
    the batch statistics entering each BatchNorm layer to the layer's running statistics, with
    total-variation and l2 image priors, and random jitter and flips at every step. Without
    BatchNorm only the weak image priors remain and the result drifts towards adversarial noise:
    `mishield.audit.budgets` flags such an audit as weak.
    """

    kind = "pixels"
    budget = PIXEL_BUDGET
    latent_clamp = None  # tanh already bounds the image
    bn_weight = 0.05  # per image: the BN term is scaled by the batch size (see `regularizer`)
    tv_weight = 0.5  # squared neighbour differences, mean over pixels (DeepInversion's TV-l2)
    l2_weight = 1e-3  # mean squared pixel: DeepInversion's l2 prior keeps intensities moderate
    jitter = 1 / 16  # max shift, fraction of a side: DeepInversion's 2 px at CIFAR's 32 px
    flip = 0.5

    def __init__(self, input_size: tuple[int, int, int]):
        super().__init__(tuple(input_size), tuple(input_size), {"source": "none", "bn_weight": self.bn_weight, "tv_weight": self.tv_weight,
                                                                "l2_weight": self.l2_weight, "jitter": self.jitter, "flip": self.flip})
        self._handles: list = []
        self._bn_terms: list[torch.Tensor] = []
        self.bn_layers = 0

    def sample(self, n: int, rng: torch.Generator, device: torch.device) -> torch.Tensor:
        return (0.5 * torch.randn(n, *self.latent_shape, generator=rng)).to(device)

    def generate(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.tanh(latents)

    def step_thetas(self, u: torch.Tensor, config) -> torch.Tensor:
        """DeepInversion's augmentation: a random shift (jitter) and a horizontal flip, no rescaling."""
        return jitter_thetas(u, self.jitter, self.flip)

    def attach(self, target: nn.Module) -> None:
        self.detach()
        for module in target.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
                self._handles.append(module.register_forward_hook(self._bn_hook))
        self.bn_layers = len(self._handles)

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._bn_terms = [], []

    def _bn_hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not torch.is_grad_enabled():
            return
        x = inputs[0].float()
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dims)
        var = x.var(dims, unbiased=False)
        self._bn_terms.append(torch.linalg.vector_norm(mean - module.running_mean) + torch.linalg.vector_norm(var - module.running_var))

    def regularizer(self, images: torch.Tensor) -> torch.Tensor | None:
        dh = (images[:, :, 1:, :] - images[:, :, :-1, :]).pow(2).mean(dim=(1, 2, 3))
        dw = (images[:, :, :, 1:] - images[:, :, :, :-1]).pow(2).mean(dim=(1, 2, 3))
        loss = self.tv_weight * (dh + dw).sum() + self.l2_weight * images.pow(2).mean(dim=(1, 2, 3)).sum()
        if self._bn_terms:
            # Batch statistics are one term per batch; scaling by the batch size keeps its weight
            # per image the same as the per-image losses, whatever --batch-size is.
            loss = loss + self.bn_weight * images.shape[0] * torch.stack(self._bn_terms).sum()
            self._bn_terms = []
        return loss

    def describe(self) -> dict:
        return {**super().describe(), "bn_layers": self.bn_layers}


# ---------------------------------------------------------------------------------------------
# Loading a prior from the command line's --prior


def _device_of(module: nn.Module) -> torch.device:
    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = next(iter(module.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _latent_dim(generator: nn.Module, source: str) -> int:
    for holder in (generator, getattr(generator, "mapping", None)):
        for attr in LATENT_ATTRS:
            value = getattr(holder, attr, None) if holder is not None else None
            if isinstance(value, int) and 0 < value <= MAX_LATENT_DIM:
                return value
            if isinstance(value, int) and not isinstance(value, bool):
                raise BadInputError(f"{source} says its latent size is {value}; a generator's must be from 1 to {MAX_LATENT_DIM}.")
    raise BadInputError(
        f"{source} does not say its latent size; give the generator an integer attribute `z_dim` (or `latent_dim`)."
    )


def _probe_output(
    fn: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor, source: str, device: torch.device | str = "cpu"
) -> tuple[int, int, int]:
    """Run two latents through the prior once and reject outputs that are not images in [-1, 1]."""
    try:
        with torch.no_grad():
            out = fn(latents.to(device))
    except Exception as err:  # noqa: BLE001 - the user's generator may fail in any way; say so in one sentence
        raise BadInputError(f"{source} failed on a latent batch of shape {tuple(latents.shape)} ({type(err).__name__}: {err}).") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[0] != latents.shape[0]:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise BadInputError(f"{source} must return images shaped (N, C, H, W) for N latents, got {shape}.")
    if out.shape[1] not in (1, 3) or min(out.shape[2:]) < 8:
        raise BadInputError(f"{source} must return 1- or 3-channel images of at least 8x8 pixels, got shape {tuple(out.shape)}.")
    lo, hi = float(out.min()), float(out.max())
    # StyleGAN outputs overshoot [-1, 1] a little; a generator for [0, 255] or unbounded values does not fit.
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -1.5 or hi > 1.5:
        raise BadInputError(f"{source} must return images in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]; rescale its output.")
    return (int(out.shape[1]), int(out.shape[2]), int(out.shape[3]))


def _load_factory(spec: str) -> nn.Module:
    from mishield.models import import_factory

    generator = import_factory(spec, "--prior")()
    if not isinstance(generator, nn.Module):
        raise BadInputError(f"--prior {spec} returned {type(generator).__name__}, not a torch.nn.Module generator.")
    return generator


class _StyleGANUnpickler(pickle.Unpickler):
    """StyleGAN2-ADA pickles embed their own source; they load only where that code is importable."""

    def find_class(self, module: str, name: str):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError) as err:
            raise BadInputError(
                f"this StyleGAN pickle needs NVIDIA's code ({module}.{name}) importable; put the stylegan2-ada-pytorch "
                f"checkout on PYTHONPATH ({err})."
            ) from None


def _load_stylegan_pickle(path: Path, trust: bool) -> nn.Module:
    if not trust:
        # Exit 3 like an untrusted pickled model file (mishield.models.loading): the file, not the
        # command line, is what cannot be used as given.
        raise BadInputError(
            f"{path} is a pickle that runs code when loaded; pass --trust-checkpoint only if you trust its source."
        )
    try:
        with open(path, "rb") as f:
            data = _StyleGANUnpickler(f).load()
    except BadInputError:
        raise
    except Exception as err:  # noqa: BLE001 - a truncated or foreign pickle fails in many ways
        raise BadInputError(f"{path} could not be unpickled ({type(err).__name__}: {first_line(err)}); the file is damaged.") from None
    generator = data.get("G_ema") if isinstance(data, dict) else data
    if not isinstance(generator, nn.Module):
        raise BadInputError(f"{path} holds no generator module (expected a StyleGAN2-ADA pickle with `G_ema`).")
    return generator.float()


def _wrap(generator: nn.Module, truncation: float, description: dict, crop: float | None = None) -> Prior:
    """`crop` None: the prior kind's default center crop (PPA's for high-resolution StyleGAN, none for z-space)."""
    if hasattr(generator, "mapping") and hasattr(generator, "synthesis"):
        return StyleGANPrior(generator, truncation, description, crop)
    return GeneratorPrior(generator, _latent_dim(generator, description["source"]), description, crop)


def load_prior(
    spec: str,
    *,
    target_input_size: tuple[int, int, int] = (3, 224, 224),
    trust_checkpoint: bool = False,
    truncation: float = 0.5,
    center_crop: float | None = None,
) -> Prior:
    """`--prior`: FILE (a mishield prior, a StyleGAN2-ADA .pkl, a TorchScript or pickled module),
    `package.module:factory`, or `none` (pixels at the target's input size). `center_crop`: the
    fraction of each side kept (None: 800/1024 for StyleGAN of >= 512 px as PPA, none for z-space generators)."""
    if spec.strip().lower() == "none":
        return PixelPrior(target_input_size)
    path = Path(spec)
    if path.exists():
        if path.is_dir():
            raise BadInputError(f"--prior {spec} is a directory; pass a generator file, package.module:factory or none.")
        return _load_prior_file(path, trust_checkpoint, truncation, center_crop)
    if ":" in spec and not spec.startswith(("/", ".")) and "/" not in spec.split(":")[0]:
        return _wrap(_load_factory(spec), truncation, {"source": spec, "format": "factory"}, center_crop)
    raise BadInputError(f"--prior {spec} is neither an existing file, a package.module:factory, nor `none`.")


def _load_file_kind(path: Path) -> str:
    """What a prior file holds, read from its first bytes without running anything: "empty",
    "safetensors", "torchscript", "pickle" (a torch.save zip or a raw pickle) or "unknown"."""
    import zipfile

    size = path.stat().st_size
    if size == 0:
        return "empty"
    with open(path, "rb") as f:
        head = f.read(16)
    header_len = int.from_bytes(head[:8], "little") if len(head) >= 9 else 0
    if path.suffix == ".safetensors" or (2 <= header_len <= size - 8 and head[8:9] == b"{"):
        return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError):
            return "unknown"
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return "torchscript"
        return "pickle" if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names) else "unknown"
    # Pickle protocols 2-5 start with PROTO (0x80); torch's legacy format is a pickle too.
    return "pickle" if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05") else "unknown"


def _load_prior_file(path: Path, trust_checkpoint: bool, truncation: float, crop: float | None = None) -> Prior:
    description = {"source": str(path)}
    kind = _load_file_kind(path)
    if kind in ("empty", "unknown"):
        # Random or truncated bytes are damaged input (exit 3); advising --trust-checkpoint for
        # them would be wrong, and unpickling them would be pointless as well as risky.
        state = "is empty (0 bytes)" if kind == "empty" else "is not a generator file mishield can read (damaged or not a prior)"
        raise BadInputError(f"--prior {path} {state}; pass a prior made by `mishield prior train`, a generator factory, or none.")
    if kind == "safetensors":
        generator, meta = load_generator_file(path)
        return GeneratorPrior(generator, generator.latent_dim, {**description, "format": meta["format"], "config": meta["config"], "training": meta.get("training", {})}, crop)
    if path.suffix == ".pkl":
        return _wrap(_load_stylegan_pickle(path, trust_checkpoint), truncation, {**description, "format": "stylegan2-ada-pickle"}, crop)
    if kind == "torchscript":
        refuse_program(f"--prior {path}", "torchscript", trust_checkpoint, "a prior made by `mishield prior train`")  # its __setstate__ runs on load
        return _wrap(_load_torchscript_prior(path), truncation, {**description, "format": "torchscript"}, crop)
    if not trust_checkpoint:
        raise BadInputError(f"{path} is a pickled Python object, not a mishield prior or TorchScript file; loading it runs its code, pass --trust-checkpoint only if you trust its source.")
    try:
        module = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - unpickling runs the file's own code
        raise BadInputError(f"{path} could not be loaded as a generator ({type(err).__name__}: {err}).") from None
    if not isinstance(module, nn.Module):
        raise BadInputError(f"{path} holds a {type(module).__name__}, not a generator module.")
    return _wrap(module, truncation, {**description, "format": "pickled-module"}, crop)


def _load_torchscript_prior(path: Path) -> nn.Module:
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # jit's deprecation notice: nothing a user can act on
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as err:  # noqa: BLE001 - any failure here means a damaged archive
        raise BadInputError(f"--prior {path} looks like a TorchScript archive but cannot be loaded ({first_line(err)}); re-export it.") from None
