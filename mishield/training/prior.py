"""Training mishield's own image prior (a DCGAN, Radford et al., 2016) on public data.

It uses the same machinery as every other trainer (`mishield.training`): the one resumable
state format written atomically after every epoch beside the output, per-epoch seeds from
`mishield.runtime.seed_epoch` (so a resumed run replays the uninterrupted one; on CPU bit for
bit), the worker rule of `mishield.runtime.default_workers`, a stop on a non-finite loss, and
Ctrl-C (exit 130) or SIGTERM (exit 143) leaving a resumable state.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from mishield.models.dcgan import (
    DCGANDiscriminator,
    DCGANGenerator,
    _check_resolution,
    save_generator,
)
from mishield.progress import EpochCallback, ProgressCallback
from mishield.runtime import Runtime, default_workers, seed_epoch
from mishield.training.interrupt import TrainingDiverged, interrupted, preemptible
from mishield.training.state import (
    data_signature,
    new_state,
    refuse_stale_state,
    resume_state,
    save_state,
    state_path_for,
)


@dataclass(frozen=True)
class PriorTrainingConfig:
    resolution: int | None = None  # None: the smallest of 32/64/128/256 holding the images (data.default_resolution)
    channels: int | None = None  # None: 1 if every sampled image is greyscale, else 3
    latent_dim: int = 128
    width: int = 64
    epochs: int = 25
    batch_size: int = 64
    lr: float = 2e-4
    seed: int = 0


def _infer_channels(items: list, probe: int = 64) -> int:
    from PIL import Image

    step = max(1, len(items) // probe)
    for path, _ in items[::step]:
        with Image.open(path) as img:
            if img.mode not in ("L", "LA", "I", "I;16", "1"):
                return 3
    return 1


def _recalibrate_bn(generator: DCGANGenerator, device: torch.device, rng: torch.Generator, batches: int = 32, batch: int = 256) -> None:
    """Replace BatchNorm running statistics by exact averages over fresh latents.

    The attack runs the generator in eval mode (so every image depends on its own latent only);
    the exponential running averages from GAN training lag the generator and wash its images out.
    """
    bns = [m for m in generator.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    generator.train()
    with torch.no_grad():
        for _ in range(batches):
            generator(torch.randn(batch, generator.latent_dim, generator=rng).to(device))
    for m in bns:
        m.momentum = 0.1
    generator.eval()


class _GAN:
    """The generator, the discriminator and their optimisers: what one epoch trains and a state holds."""

    def __init__(self, config: PriorTrainingConfig, device: torch.device):
        torch.manual_seed(config.seed)
        self.config, self.device = config, device
        self.generator = DCGANGenerator(config.latent_dim, config.resolution, config.channels, config.width).to(device)
        self.discriminator = DCGANDiscriminator(config.resolution, config.channels, config.width).to(device)
        for m in list(self.generator.modules()) + list(self.discriminator.modules()):
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=config.lr, betas=(0.5, 0.999))
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=config.lr, betas=(0.5, 0.999))
        self.loss_fn = nn.BCEWithLogitsLoss()

    def payload(self) -> dict:
        return {"generator": self.generator.state_dict(), "discriminator": self.discriminator.state_dict(),
                "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict()}

    def restore(self, state: dict) -> None:
        self.generator.load_state_dict(state["generator"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])

    def step(self, real: torch.Tensor, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One discriminator and one (non-saturating) generator update; the losses stay on the device."""
        n = real.shape[0]
        z = torch.randn(n, self.config.latent_dim, generator=rng).to(self.device)
        fake = self.generator(z)
        ones = torch.ones(n, device=self.device)
        zeros = torch.zeros(n, device=self.device)
        self.opt_d.zero_grad(set_to_none=True)
        loss_d = self.loss_fn(self.discriminator(real), ones) + self.loss_fn(self.discriminator(fake.detach()), zeros)
        loss_d.backward()
        self.opt_d.step()
        self.opt_g.zero_grad(set_to_none=True)
        loss_g = self.loss_fn(self.discriminator(fake), ones)
        loss_g.backward()
        self.opt_g.step()
        return loss_d.detach(), loss_g.detach()


def _epoch(gan: _GAN, dataset, epoch: int, workers: int, progress: ProgressCallback | None) -> dict:
    """One pass over the public images with this epoch's seeds; returns the epoch record."""
    from torch.utils.data import DataLoader

    config = gan.config
    # Seeded per epoch from (seed, epoch) alone, so a resumed run sees the same batches, flips
    # (drawn from the global generator) and noise as an uninterrupted one.
    rng = torch.Generator().manual_seed(seed_epoch(config.seed, epoch, 0))
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, drop_last=True, generator=rng,
                        num_workers=workers)
    steps = max(1, len(dataset) // config.batch_size)
    gan.generator.train()
    gan.discriminator.train()
    sums = torch.zeros(2, device=gan.device)
    t0 = time.perf_counter()
    for i, (real, _) in enumerate(loader):
        loss_d, loss_g = gan.step(real.to(gan.device, non_blocking=True), rng)
        sums += torch.stack([loss_d, loss_g])
        if progress is not None:
            progress("prior", epoch * steps + i + 1, config.epochs * steps)
    loss_d, loss_g = (sums / max(1, len(loader))).tolist()
    if not (torch.isfinite(sums).all()):
        raise TrainingDiverged(
            f"the prior's loss became non-finite in epoch {epoch + 1} (D {loss_d}, G {loss_g}); the last good state "
            "is kept — lower --lr and rerun (--resume continues from it)."
        )
    return {"stage": "prior", "epoch": epoch + 1, "epochs": config.epochs, "loss_d": loss_d, "loss_g": loss_g,
            "seconds": time.perf_counter() - t0}


def train_prior(
    data_dir: str | Path,
    out: str | Path,
    config: PriorTrainingConfig = PriorTrainingConfig(),
    *,
    device: torch.device | str = "cpu",
    resume: bool = False,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    on_epoch: EpochCallback | None = None,
) -> Path:
    """Train a DCGAN on the public images in `data_dir` (an ImageFolder; labels are ignored).

    The resumable state (`<out>.train-state`) is written after every epoch, so an interrupted
    run continues with `resume=True`; it is removed once `out` is written. A state left by an
    interrupted run is refused unless `resume` (continue it) or `overwrite` (drop it) is given.
    The file records the per-epoch losses and the training images' fingerprint and pixel hashes
    (an audit refuses private data among them), and keeps the discriminator: it has seen only these
    public images, and the audit reads reconstructions in its features (docs/audit.md,
    "Distribution metrics and the KNN judge"). A grid of samples goes to `samples_path(out)`.
    """
    from mishield.fileio import claim_output

    out = Path(out)
    if config.resolution is not None:
        _check_resolution(config.resolution)
    state_path = state_path_for(out)
    # The prior, its state and its samples grid are checked against the data, and `out` locked for the run.
    with claim_output(out, overwrite, (data_dir,), (state_path, samples_path(out))):
        refuse_stale_state(state_path, resume, overwrite)
        return _train_prior(Path(data_dir), out, config, device, resume, overwrite, progress, on_epoch)


def _train_prior(data_dir: Path, out: Path, config: PriorTrainingConfig, device, resume: bool, overwrite: bool,
                 progress: ProgressCallback | None, on_epoch: EpochCallback | None) -> Path:
    from mishield.data import (
        ImageDataset,
        data_fingerprint,
        default_resolution,
        load_image_folders,
    )

    state_path = state_path_for(out)
    splits = load_image_folders(data_dir)
    items = splits.train + splits.val
    config = PriorTrainingConfig(**{**asdict(config), "channels": config.channels or _infer_channels(items),
                                    "resolution": config.resolution or default_resolution(items)})
    provenance, hashes = data_fingerprint(items, splits.classes)
    device = torch.device(device)
    gan = _GAN(config, device)
    fingerprint = {"config": asdict(config), "images": len(items), "data": data_signature(items)}
    state = resume_state(state_path, resume, fingerprint, kind="prior",
                         required=("generator", "discriminator", "opt_g", "opt_d"))
    if state is not None:
        gan.restore(state)
    dataset = ImageDataset(items, _transform(config), channels=config.channels)
    workers = default_workers(Runtime(device))
    epoch = start = int(state["epoch"]) if state else 0
    # Each epoch's mean losses travel in the state (a resumed run keeps the earlier ones) and end in the file.
    losses = list(state.get("losses", [])) if state else []
    try:
        with preemptible():
            for epoch in range(start, config.epochs):
                record = _epoch(gan, dataset, epoch, workers, progress)
                losses.append({"epoch": epoch + 1, "loss_d": record["loss_d"], "loss_g": record["loss_g"]})
                save_state(state_path, new_state("prior", epoch + 1, fingerprint, **gan.payload(), losses=losses))
                if on_epoch is not None:
                    on_epoch(record)
    except KeyboardInterrupt as err:
        raise interrupted(err, f"prior epoch {epoch + 1}", state_path) from None

    _recalibrate_bn(gan.generator, device, torch.Generator().manual_seed(config.seed + 7))
    training = {"data": str(Path(data_dir)), "classes": splits.classes, "images": len(dataset), "epochs": config.epochs,
                "batch_size": config.batch_size, "lr": config.lr, "seed": config.seed, "data_fingerprint": provenance,
                "losses": losses}
    save_generator(out, gan.generator.cpu(), training, overwrite=overwrite, image_hashes=hashes,
                   discriminator=gan.discriminator.cpu().eval())
    state_path.unlink(missing_ok=True)
    write_samples(gan.generator, samples_path(out), seed=config.seed)
    return out


def samples_path(out: str | Path) -> Path:
    """Where `train_prior` puts its grid of samples: `<out>.samples.png` beside the prior."""
    out = Path(out)
    return out.with_name(out.name + ".samples.png")


@torch.no_grad()
def write_samples(generator: nn.Module, path: Path, *, seed: int = 0, n: int = 64) -> Path:
    """An 8x8 grid of the generator's images from seeded latents, so a user can judge the prior by eye."""
    from PIL import Image
    from torchvision.utils import make_grid

    from mishield.fileio import atomic_output

    generator = generator.eval().cpu()
    z = torch.randn(n, generator.latent_dim, generator=torch.Generator().manual_seed(seed + 11))
    grid = make_grid(generator(z).clamp(-1, 1) * 0.5 + 0.5, nrow=8, padding=2, pad_value=1.0)
    array = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    if generator.channels == 1:
        array = array[:, :, 0]
    with atomic_output(path, True) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return path


def _transform(config: PriorTrainingConfig):
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(config.resolution),
        T.CenterCrop(config.resolution),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize([0.5] * config.channels, [0.5] * config.channels),
    ])  # fmt: skip
