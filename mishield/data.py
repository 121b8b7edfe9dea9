"""Private training data: ImageFolder directories, the embedded Fashion-MNIST subset, transforms.

A dataset is a list of `(path, label)` pairs; labels index the sorted class-folder names of the
training set (torchvision's ImageFolder convention), so a validation folder is labelled by the
training set's class list, never by its own.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import logging
import os
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision import transforms as T

from mishield.errors import BadInputError, UsageError
from mishield.preprocessing import Preprocessing

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
EMBEDDED_ASSET = "fashion_mnist_subset.npz"
_log = logging.getLogger(__name__)
# Held out (seeded, per class) to measure natural accuracy when the data has no val/ folder.
DEFAULT_VAL_FRACTION = 0.1

Item = tuple[Path, int]


@dataclass
class DataSplits:
    """Training and validation items, labelled by index into `classes`."""

    train: list[Item]
    val: list[Item]
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# ---------------------------------------------------------------------------------------------
# The embedded Fashion-MNIST subset (docs/architecture.md §8)


class FashionMNISTSubset(NamedTuple):
    train_images: np.ndarray  # (N, 28, 28) uint8
    train_labels: np.ndarray  # (N,) uint8, original Fashion-MNIST labels 0..9
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: list[str]  # folder-safe, prefixed with the label so sorting keeps label order


def load_embedded_fashion_mnist() -> FashionMNISTSubset:
    """The Fashion-MNIST subset shipped with mishield: 300 train + 100 test images per class.

    Fashion-MNIST is (c) 2017 Zalando SE, MIT licence; see mishield/assets/FASHION_MNIST_LICENSE.txt.
    """
    resource = importlib.resources.files("mishield") / "assets" / EMBEDDED_ASSET
    with importlib.resources.as_file(resource) as path, np.load(path) as npz:
        return FashionMNISTSubset(
            train_images=npz["train_images"],
            train_labels=npz["train_labels"],
            test_images=npz["test_images"],
            test_labels=npz["test_labels"],
            class_names=[str(n) for n in npz["class_names"]],
        )


def materialize_fashion_mnist(
    dest: Path,
    classes: Sequence[int] | None = None,
    *,
    train_per_class: int | None = None,
    val_per_class: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the embedded subset as an ImageFolder: dest/train/<class>/*.png and dest/val/<class>/*.png.

    `classes` picks original Fashion-MNIST labels (e.g. 0..4 as private data and 5..9 as the
    attacker's public data: a class-disjoint split). `*_per_class` caps the images per class.
    Returns `dest`.
    """
    subset = load_embedded_fashion_mnist()
    wanted = list(range(len(subset.class_names))) if classes is None else [int(c) for c in classes]
    bad = [c for c in wanted if not 0 <= c < len(subset.class_names)]
    if bad or not wanted:
        raise UsageError(f"Fashion-MNIST classes must be distinct labels in 0..9, got {list(classes or [])}.")
    if len(set(wanted)) != len(wanted):
        raise UsageError(f"Fashion-MNIST classes must be distinct, got {wanted}.")
    dest = Path(dest)
    for split in ("train", "val"):
        target = dest / split
        if target.exists() and any(target.iterdir()):
            if not overwrite:
                raise UsageError(f"{target} already holds files; choose an empty destination or pass --overwrite.")
            shutil.rmtree(target)
    for split, images, labels, cap in (
        ("train", subset.train_images, subset.train_labels, train_per_class),
        ("val", subset.test_images, subset.test_labels, val_per_class),
    ):
        for c in wanted:
            folder = dest / split / subset.class_names[c]
            folder.mkdir(parents=True, exist_ok=True)
            idx = np.flatnonzero(labels == c)
            if cap is not None:
                idx = idx[:cap]
            for n, i in enumerate(idx):
                Image.fromarray(images[i], mode="L").save(folder / f"{n:04d}.png")
    return dest


# ---------------------------------------------------------------------------------------------
# ImageFolder directories


def _class_folders(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.startswith(".")
    )


def _check_image(path: Path) -> None:
    # Opening reads only the header and verify() checks the container (PNG chunk CRCs, ...)
    # without decoding pixels: cheap enough to run over every file before training starts, so a
    # broken file fails in the first second rather than deep into epoch 3.
    try:
        with Image.open(path) as img:
            img.verify()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as err:
        raise BadInputError(
            f"{path} is not a readable image ({err.__class__.__name__}); remove or replace that file."
        ) from None


def _check_images(files: list[Path]) -> None:
    if len(files) < 256:
        for f in files:
            _check_image(f)
        return
    # Header checks are file-system bound; threads overlap the reads (ImageNet-sized folders).
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) * 4)) as pool:
        for _ in pool.map(_check_image, files):
            pass


def _scan(root: Path, role: str, classes: list[str] | None, verify: bool) -> tuple[list[Item], list[str]]:
    if not root.exists():
        raise BadInputError(f"{role} folder {root} does not exist; pass an ImageFolder directory (one sub-folder per class).")
    if not root.is_dir():
        raise BadInputError(f"{role} path {root} is not a directory; pass an ImageFolder directory (one sub-folder per class).")
    folders = _class_folders(root)
    if not folders:
        raise BadInputError(
            f"{role} folder {root} has no class sub-folders; it must hold one sub-folder of images per class."
        )
    names = [f.name for f in folders]
    if classes is None:
        classes = names
    else:
        unknown = sorted(set(names) - set(classes))
        if unknown:
            raise BadInputError(
                f"{role} folder {root} has classes the training data lacks ({', '.join(unknown[:5])}); "
                "both must use the same class folder names."
            )
    index = {name: i for i, name in enumerate(classes)}
    items: list[Item] = []
    for folder in folders:
        files = _image_files(folder)
        if not files:
            raise BadInputError(
                f"class folder {folder} contains no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                "add images or remove the folder."
            )
        if verify:
            _check_images(files)
        items.extend((f, index[folder.name]) for f in files)
    return items, classes


def _stratified_split(items: list[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    rng = random.Random(seed)
    by_class: dict[int, list[Item]] = {}
    for item in items:
        by_class.setdefault(item[1], []).append(item)
    train, val = [], []
    for label in sorted(by_class):
        group = list(by_class[label])
        rng.shuffle(group)
        n_val = round(len(group) * fraction)
        n_val = min(max(n_val, 1), len(group) - 1) if len(group) > 1 else 0
        val.extend(group[:n_val])
        train.extend(group[n_val:])
    return sorted(train), sorted(val)


def load_image_folders(
    data_dir: str | Path,
    val_dir: str | Path | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
    *,
    verify: bool = True,
) -> DataSplits:
    """Read an ImageFolder dataset.

    Layouts: `data_dir/train/` + `data_dir/val/`; `data_dir` (or `data_dir/train/`) plus an explicit
    `val_dir`; or a single training folder, split per class with `val_fraction` (seeded) or used
    without validation data. Every image header is checked up front (`verify`).
    """
    data_dir = Path(data_dir)
    if val_fraction is not None and not 0.0 < val_fraction < 1.0:
        raise UsageError(f"`val_fraction` must lie strictly between 0 and 1, got {val_fraction}.")
    if val_fraction is not None and val_dir is not None:
        raise UsageError("`val_data` and `val_fraction` both choose the validation set; pass only one.")
    train_root = data_dir / "train" if (data_dir / "train").is_dir() else data_dir
    if val_dir is None and train_root != data_dir and (data_dir / "val").is_dir():
        if val_fraction is not None:
            raise UsageError(f"{data_dir} already has a val/ folder; drop `val_fraction` or point `data` at train/.")
        val_dir = data_dir / "val"
    train, classes = _scan(train_root, "training", None, verify)
    val: list[Item] = []
    if val_dir is not None:
        val, _ = _scan(Path(val_dir), "validation", classes, verify)
    elif val_fraction is not None:
        train, val = _stratified_split(train, val_fraction, seed)
    return DataSplits(train=train, val=val, classes=classes)


def has_validation(data_dir: str | Path, val_dir: str | Path | None = None) -> bool:
    """Whether `load_image_folders(data_dir, val_dir)` finds validation images without a split."""
    data_dir = Path(data_dir)
    return val_dir is not None or ((data_dir / "train").is_dir() and (data_dir / "val").is_dir())


def resolve_val_fraction(data_dir: str | Path, val_dir: str | Path | None = None,
                         val_fraction: float | None = None) -> float | None:
    """`val_fraction`, or DEFAULT_VAL_FRACTION when nothing else gives validation images, so that
    natural accuracy is always measured; says so, since a model trained on all of `data_dir` has
    seen those images (its accuracy on them is then an overestimate)."""
    if val_fraction is not None or has_validation(data_dir, val_dir):
        return val_fraction
    _log.warning(
        "%s has no val/ folder: holding out a seeded %d %% of it to measure natural accuracy "
        "(pass `val_data` or `val_fraction` to choose; if the model was trained on these images, "
        "the accuracy is an overestimate).", data_dir, round(100 * DEFAULT_VAL_FRACTION),
    )
    return DEFAULT_VAL_FRACTION


def fit_resolution(loaded, items: Sequence[Item], input_size_given: bool):
    """`loaded` (a `mishield.models.LoadedModel`) at the data's resolution when its file cannot say
    which one it was trained at.

    A plain state dict gets its preprocessing from the architecture's defaults (224 px for most),
    which would silently upsample 32 px images sevenfold and cost fifty times the compute; it gets
    `default_resolution` instead, the size the prior and the evaluation model default to. A mishield
    file (or an explicit `input_size`) is kept, with a warning when it is far from the data's.
    """
    native, size = native_size(items), default_resolution(items)  # the prior's and evaluator's rule too
    current = min(loaded.preprocessing.input_size[1:])
    if input_size_given or loaded.kind in ("mishield", "torchscript", "exported"):  # these know their size
        if not 0.5 <= native / current <= 2.0:
            _log.warning(
                "the model takes %d px inputs but the images in the data are about %d px; "
                "check `input_size` (--input-size).", current, native,
            )
        return loaded
    if size != current:
        _log.warning(
            "%s does not record its input size; using the data's %d px instead of the architecture's "
            "default %d px (pass `input_size` (--input-size) to choose).",
            loaded.source or loaded.arch, size, current,
        )
    return dataclasses.replace(loaded, preprocessing=loaded.preprocessing.with_input_size(size))


def check_num_classes(splits: DataSplits, num_classes: int | None) -> None:
    """The data's class folders must match the classifier's outputs (or the head is reset)."""
    if num_classes is not None and splits.num_classes != num_classes:
        raise BadInputError(
            f"the data has {splits.num_classes} class folders but the model has {num_classes} outputs; "
            "pass `reset_head` to train a new classifier head for these classes, or fix the folders."
        )


# ---------------------------------------------------------------------------------------------
# Datasets and transforms


def decode_image(path: str | Path, mode: str) -> Image.Image:
    """The image at `path`, fully decoded and converted to `mode` ("L" or "RGB").

    The scan before training (`_check_image`) reads headers only, so a file whose pixel data is
    cut off (a truncated JPEG) passes it and fails here, when its pixels are first needed:
    a damaged input (exit 3) naming the file, wherever it is read.
    """
    try:
        with Image.open(path) as img:
            return img.convert(mode)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as err:
        raise BadInputError(f"{path} could not be decoded ({err.__class__.__name__}); remove or replace that file.") from None


class ImageDataset(torch.utils.data.Dataset):
    """`(path, label)` items loaded with PIL; grayscale feeds 3-channel models and vice versa."""

    def __init__(self, items: Sequence[Item], transform: Callable | None = None, channels: int = 3):
        self.items = list(items)
        self.transform = transform
        self.mode = "L" if channels == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        img = decode_image(path, self.mode)
        return (self.transform(img) if self.transform else img), label


_INTERPOLATION = {
    "nearest": T.InterpolationMode.NEAREST,
    "bilinear": T.InterpolationMode.BILINEAR,
    "bicubic": T.InterpolationMode.BICUBIC,
    "lanczos": T.InterpolationMode.LANCZOS,
    "box": T.InterpolationMode.BOX,
    "hamming": T.InterpolationMode.HAMMING,
}


def _interpolation(pre: Preprocessing) -> T.InterpolationMode:
    return _INTERPOLATION.get(pre.interpolation, T.InterpolationMode.BILINEAR)


def _normalize(pre: Preprocessing) -> T.Normalize:
    channels = pre.input_size[0]
    mean, std = list(pre.mean), list(pre.std)
    if len(mean) != channels:  # e.g. ImageNet statistics recorded for a 1-channel model
        mean, std = [sum(mean) / len(mean)] * channels, [sum(std) / len(std)] * channels
    return T.Normalize(mean, std)


def train_transform(pre: Preprocessing) -> Callable:
    """The paper's fine-tuning augmentation (after PPA's training recipe)."""
    size = tuple(pre.input_size[1:])
    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=(0.85, 1.0), ratio=(1.0, 1.0), interpolation=_interpolation(pre)),
            T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.1, hue=0.1),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            _normalize(pre),
        ]
    )


def eval_transform(pre: Preprocessing) -> Callable:
    size = tuple(pre.input_size[1:])
    return T.Compose([T.Resize(size, interpolation=_interpolation(pre)), T.ToTensor(), _normalize(pre)])


# ---------------------------------------------------------------------------------------------
# Fingerprints and native size (provenance of evaluation models and priors; docs/audit.md "Trust checks")

# Allowed prior resolutions (mishield.attack.generators); the default input size of `prior train`
# and `train-eval` is the smallest of these that holds the images' native size.
RESOLUTIONS = (32, 64, 128, 256)


def image_hash(path: str | Path) -> int:
    """A 64-bit hash of an image's decoded pixels (as 8-bit RGB), not of its file bytes.

    Pixels, so a copy under another name or re-saved losslessly (other PNG compression, BMP)
    still matches, and RGB, so a greyscale copy stored as RGB matches too; a lossy re-encoding
    (JPEG) or a resized copy does not (a documented limit, docs/audit.md "Trust checks").
    64 bits: a chance collision among a million images has probability ~3e-8.
    """
    import hashlib

    rgb = decode_image(path, "RGB")
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}\n".encode() + rgb.tobytes()).digest()
    return int.from_bytes(digest[:8], "little", signed=True)  # signed: fits an int64 tensor


def item_hashes(items: Sequence[Item]) -> list[int]:
    """`image_hash` of every item, in item order (threads: PIL's decoding releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        return list(pool.map(image_hash, [p for p, _ in items]))


def data_fingerprint(items: Sequence[Item], classes: Sequence[str]) -> tuple[dict, np.ndarray]:
    """What a model or prior records about its training images, and their sorted pixel hashes.

    The fingerprint's digest is sha256 over the sorted (class name, pixel hash) pairs: independent
    of file names, order and location; changed by any added, removed, relabelled or edited image.
    The hashes (int64) let an audit find private images among a prior's training images.
    """
    import hashlib

    hashes = item_hashes(items)
    pairs = sorted((classes[label], h) for (_, label), h in zip(items, hashes))
    digest = hashlib.sha256("".join(f"{c}\t{h & (2**64 - 1):016x}\n" for c, h in pairs).encode()).hexdigest()
    fingerprint = {"images": len(items), "classes": list(classes), "sha256": digest,
                   "method": "sha256 over sorted (class, sha256(RGB pixels)[:8])"}
    return fingerprint, np.sort(np.asarray(hashes, dtype=np.int64))


def native_size(items: Sequence[Item], probe: int = 64) -> int:
    """The larger side of the largest of up to `probe` images spread over `items` (header reads only)."""
    step = max(1, len(items) // probe)
    size = 0
    for path, _ in list(items)[::step][:probe]:
        with Image.open(path) as img:
            size = max(size, *img.size)
    return size


def default_resolution(items: Sequence[Item]) -> int:
    """The smallest prior resolution that holds the images' native size (28 px Fashion-MNIST -> 32), at most 256."""
    size = native_size(items)
    return next((r for r in RESOLUTIONS if r >= size), RESOLUTIONS[-1])
