"""Small networks and generators for the attack tests, importable as `attack_support:NAME` specs.

pytest puts tests/ on sys.path (rootdir conftest, no __init__.py); subprocesses get it through
PYTHONPATH.
"""

from __future__ import annotations

import torch
from torch import nn

from mishield.preprocessing import Preprocessing
from mishield.runtime import Runtime

CPU = Runtime(torch.device("cpu"))
# Normalised input == prior image: (x + 1) / 2 normalised by 0.5 / 0.5 is x again.
HALF = Preprocessing((3, 8, 8), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.downsample(x))


def tiny_resnet(num_classes: int = 10, width: int = 16) -> nn.Module:
    """A CIFAR-style ResNet (4 stages of one block) small enough to train in seconds on a CPU."""
    w = width
    return nn.Sequential(
        nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
        _Block(w, w, 1), _Block(w, 2 * w, 2), _Block(2 * w, 4 * w, 2), _Block(4 * w, 8 * w, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8 * w, num_classes),
    )  # fmt: skip


def small_plain_cnn(num_classes: int = 10) -> nn.Module:
    """The default evaluation architecture at a test-sized width (skip-free, unlike the target)."""
    from mishield.models.plaincnn import plain_cnn

    return plain_cnn(num_classes, width=16)


class TinyGenerator(nn.Module):
    """z (8) -> 1x16x16 images through tanh: a generator factory a user might pass."""

    z_dim = 8

    def __init__(self, scale: float = 1.0, flat: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(8, 16 * 16)
        self.scale, self.flat = scale, flat

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.fc(z)) * self.scale
        return x if self.flat else x.view(-1, 1, 16, 16)


def tiny_generator() -> nn.Module:
    return TinyGenerator()


def generator_0_255() -> nn.Module:
    """Wrong range: images in [0, 255]."""
    return TinyGenerator(scale=255.0)


def generator_flat() -> nn.Module:
    """Wrong shape: vectors instead of images."""
    return TinyGenerator(flat=True)


class _Mapping(nn.Module):
    z_dim = 8

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 6)
        self.register_buffer("w_avg", torch.full((6,), 0.25))

    def forward(self, z: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        return self.fc(z)[:, None, :].expand(-1, 3, -1)  # (N, num_ws, w_dim), as StyleGAN2-ADA


class _Synthesis(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3 * 16 * 16)
        self.calls: list[torch.Size] = []

    def forward(self, ws: torch.Tensor) -> torch.Tensor:
        self.calls.append(ws.shape)
        return torch.tanh(self.fc(ws.mean(dim=1))).view(-1, 3, 16, 16)


class StyleGANLike(nn.Module):
    """The StyleGAN2-ADA layout: `mapping` (z, c) -> ws and `synthesis` ws -> images."""

    z_dim, c_dim = 8, 0

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.mapping = _Mapping()
        self.synthesis = _Synthesis()


def stylegan_like() -> nn.Module:
    return StyleGANLike()


def noise_image_folder(root, per_class: int, classes=("a", "b", "c"), size: int = 20, seed: int = 0):
    """An ImageFolder of random greyscale PNGs, `root/<class>/<i>.png`, for tests of wiring and exit
    codes that need readable images but no learnable content. Returns `root`."""
    from pathlib import Path

    from PIL import Image

    root = Path(root)
    gen = torch.Generator().manual_seed(seed)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            arr = (torch.rand(size, size, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr, mode="L").save(root / c / f"{i}.png")
    return root


def noise_splits(root, train: int, val: int, classes=("a", "b", "c"), size: int = 16, seed: int = 0):
    """`root/train/<class>/<i>.png` and `root/val/...`: random greyscale PNGs (one generator, train
    first), for wiring tests that need an ImageFolder with a val/ split but no learnable content."""
    from pathlib import Path

    from PIL import Image

    root = Path(root)
    gen = torch.Generator().manual_seed(seed)
    for split, count in (("train", train), ("val", val)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(count):
                arr = (torch.rand(size, size, generator=gen) * 255).to(torch.uint8).numpy()
                Image.fromarray(arr, mode="L").save(root / split / c / f"{i}.png")
    return root


def class_disjoint_folders(fmnist_dir, root):
    """private/ (classes 0-4) and public/ (5-9) of the shared Fashion-MNIST folder, as ImageFolders of
    links (train/ and val/ each): the target never sees the attacker's public classes, as in the demo."""
    from pathlib import Path

    root = Path(root)
    names = sorted(p.name for p in (Path(fmnist_dir) / "train").iterdir())
    for role, group in (("private", names[:5]), ("public", names[5:])):
        for split in ("train", "val"):
            (root / role / split).mkdir(parents=True)
            for name in group:
                (root / role / split / name).symlink_to(Path(fmnist_dir) / split / name, target_is_directory=True)
    return root / "private", root / "public"


def train_tiny_target(private, out, epochs: int, seed: int = 0):
    """A `tiny_resnet` trained on the private ImageFolder at 32 px and saved as a mishield file with its class names."""
    from mishield.data import load_image_folders
    from mishield.models import save_model
    from mishield.preprocessing import Preprocessing
    from mishield.training import fit

    pre = Preprocessing((3, 32, 32), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    splits = load_image_folders(private)
    torch.manual_seed(seed)
    model = tiny_resnet(len(splits.classes))
    fit(model, splits, pre, epochs=epochs, lr=1e-3, batch_size=64, device="cpu", seed=seed, workers=0)
    save_model(out, model, arch="attack_support:tiny_resnet", num_classes=len(splits.classes), surgery=None,
               preprocessing=pre, extra={"classes": splits.classes})
    return out


def flat_colour_prior():
    """A prior whose latent (3,) gives an 8x8 image of one colour tanh(latent): every crop of it looks the same."""
    from mishield.attack.priors import Prior

    class FlatColourPrior(Prior):
        def __init__(self):
            super().__init__((3, 8, 8), (3,), {"source": "test"})

        def generate(self, latents: torch.Tensor) -> torch.Tensor:
            return torch.tanh(latents)[:, :, None, None].expand(-1, -1, 8, 8)

    return FlatColourPrior()


def train_on_tensors(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float = 2e-3) -> nn.Module:
    """Adam on cross-entropy in shuffled batches of 50 (seeded): the small Fashion-MNIST models of the attack tests."""
    import torch.nn.functional as F

    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)  # the embedded file is sorted by class
        for i in range(0, len(x), 50):
            optimizer.zero_grad()
            F.cross_entropy(model(x[order[i : i + 50]]), y[order[i : i + 50]]).backward()
            optimizer.step()
    return model.eval()
