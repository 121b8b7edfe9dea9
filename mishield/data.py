"""Private training data: ImageFolder directories, the embedded Fashion-MNIST subset, transforms.

A dataset is a list of `(path, label)` pairs; labels index the sorted class-folder names of the
training set (torchvision's ImageFolder convention), so a validation folder is labelled by the
training set's class list, never by its own.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import io
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
    held_out: dict | None = None  # how `val` was drawn from one folder ({"val_fraction", "seed"}); None: a val/ folder

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def hold_out(splits: DataSplits, fraction: float, seed: int) -> DataSplits:
    """`splits`' training images with a seeded `fraction` of each class held out for validation:
    the one split every command draws from a folder without val/ (`load_image_folders` too), so the
    same (fraction, seed) always holds out the same images."""
    if not 0.0 < fraction < 1.0:
        raise UsageError(f"`val_fraction` must lie strictly between 0 and 1, got {fraction}.")
    train, val = _stratified_split(splits.train, fraction, seed)
    return DataSplits(train=train, val=val, classes=splits.classes, held_out={"val_fraction": fraction, "seed": seed})


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
    _clear_splits(dest, overwrite)
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


def _clear_splits(dest: Path, overwrite: bool) -> None:
    """Refuse to mix into a dest/train or dest/val that holds files, or (`overwrite`) empty them."""
    for split in ("train", "val"):
        target = dest / split
        if target.exists() and any(target.iterdir()):
            if not overwrite:
                raise UsageError(f"{target} already holds files; choose an empty destination or pass --overwrite.")
            shutil.rmtree(target)


# ---------------------------------------------------------------------------------------------
# The embedded Omniglot subsets (mishield/assets/omniglot/README.md)

OMNIGLOT_FOLDER = "omniglot"
# The two zips as the dataset's repository releases them (also in assets/omniglot/SHA256SUMS);
# checked on every read, so a damaged installation fails loudly instead of training on garbage.
OMNIGLOT_SHA256 = {
    "images_background_small1.zip": "f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4",
    "images_background_small2.zip": "3ccaa407515a8778e5d0861875af38b17e418f301ad5bb3b5a6b65d901a41c7f",
}
# Whole alphabets separate the roles, so the attacker's prior shares no class with the target.
OMNIGLOT_ROLES = {
    "private": ("Japanese_(katakana)", "Korean", "Sanskrit"),  # 47 + 40 + 42 = 129 characters
    "public": ("Balinese", "Early_Aramaic", "Greek", "Latin", "Tagalog"),  # 24 + 22 + 24 + 26 + 17 = 113
}
OMNIGLOT_DRAWERS = tuple(range(1, 21))  # every character was drawn once by each of 20 people
OMNIGLOT_TRAIN_DRAWERS = OMNIGLOT_DRAWERS[:15]
OMNIGLOT_VAL_DRAWERS = OMNIGLOT_DRAWERS[15:]
OMNIGLOT_NATIVE_SIZE = 105


class OmniglotImages(NamedTuple):
    """Raw Omniglot drawings in a fixed order: by alphabet name, character number, drawer."""

    ink: np.ndarray  # (N, 105, 105) bool, True where the pen drew (the files' black pixels)
    alphabet: np.ndarray  # (N,) int64, index into `alphabets`
    character: np.ndarray  # (N,) int64, NN of the folder characterNN (1-based, per alphabet)
    drawer: np.ndarray  # (N,) int64, DRAWER of the file name ID_DRAWER.png (1..20)
    paths: tuple[str, ...]  # "ALPHABET/characterNN/ID_DRAWER.png", as in the zip
    alphabets: tuple[str, ...]  # sorted alphabet names


def _omniglot_zips() -> list[tuple[str, bytes]]:
    """The shipped zips' bytes, each checked against OMNIGLOT_SHA256."""
    import hashlib

    folder = importlib.resources.files("mishield") / "assets" / OMNIGLOT_FOLDER
    out = []
    for name, expected in sorted(OMNIGLOT_SHA256.items()):
        resource = folder / name
        if not resource.is_file():
            raise BadInputError(f"mishield's embedded Omniglot file {name} is missing; reinstall mishield.")
        raw = resource.read_bytes()
        if hashlib.sha256(raw).hexdigest() != expected:
            raise BadInputError(f"mishield's embedded Omniglot file {name} is damaged (its sha256 differs from "
                                "mishield.data.OMNIGLOT_SHA256); reinstall mishield.")
        out.append((name, raw))
    return out


def _omniglot_members(zips: list[tuple[str, bytes]]) -> dict[str, bytes]:
    """"ALPHABET/characterNN/ID_DRAWER.png" -> PNG bytes over both zips; an alphabet in both
    (Greek, Latin) must hold identical files in both, and is read once."""
    import zipfile

    members: dict[str, bytes] = {}
    for name, raw in zips:
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            for info in archive.infolist():
                parts = info.filename.split("/")
                if info.is_dir() or len(parts) != 4 or not parts[3].endswith(".png"):
                    continue
                key, data = "/".join(parts[1:]), archive.read(info)
                if members.setdefault(key, data) != data:
                    raise BadInputError(f"mishield's embedded Omniglot zips disagree about {key} ({name}); reinstall mishield.")
    return members


def _omniglot_key(path: str) -> tuple[str, int, int]:
    """"Korean/character07/0649_16.png" -> ("Korean", 7, 16): alphabet, character, drawer."""
    alphabet, character, file = path.split("/")
    return alphabet, int(character.removeprefix("character")), int(file.removesuffix(".png").rsplit("_", 1)[1])


@functools.lru_cache(maxsize=1)
def _omniglot_index() -> dict[str, bytes]:
    """Every drawing's PNG bytes, in the fixed order (alphabet name, character, drawer)."""
    members = _omniglot_members(_omniglot_zips())
    return {key: members[key] for key in sorted(members, key=_omniglot_key)}


@functools.cache
def _omniglot_ink(key: str) -> np.ndarray:
    # Decoded on first use and kept (11 KB a drawing): a small test decodes only what it reads.
    with Image.open(io.BytesIO(_omniglot_index()[key])) as img:
        ink = ~np.asarray(img.convert("1"), dtype=bool)  # the files draw black (0) strokes on white
    if ink.shape != (OMNIGLOT_NATIVE_SIZE, OMNIGLOT_NATIVE_SIZE):
        raise BadInputError(f"mishield's embedded Omniglot image {key} is {ink.shape[1]}x{ink.shape[0]} px, not 105x105; "
                            "reinstall mishield.")
    ink.flags.writeable = False  # shared by every later caller
    return ink


def _omniglot_alphabets(alphabets: str | Sequence[str] | None, known: Sequence[str]) -> list[str]:
    if alphabets is None or alphabets == "all":
        return sorted(known)
    if isinstance(alphabets, str):
        if alphabets not in OMNIGLOT_ROLES:
            raise UsageError(f"`alphabets` must be a role ({', '.join(OMNIGLOT_ROLES)}, all) or a list of alphabet "
                             f"names, got {alphabets!r}.")
        return sorted(OMNIGLOT_ROLES[alphabets])
    wanted = [str(a) for a in alphabets]
    unknown = [a for a in wanted if a not in known]
    if unknown or not wanted or len(set(wanted)) != len(wanted):
        raise UsageError(f"`alphabets` must be distinct names among {', '.join(known)}; got {wanted}.")
    return sorted(wanted)


def load_embedded_omniglot(alphabets: str | Sequence[str] | None = None, *,
                           characters_per_alphabet: int | None = None) -> OmniglotImages:
    """The Omniglot drawings shipped with mishield (8 alphabets, 242 characters, 20 drawers each).

    `alphabets`: a role of OMNIGLOT_ROLES ("private", "public"), "all"/None, or alphabet names;
    `characters_per_alphabet` keeps each alphabet's first N characters (small tests). Every call
    checks the zips' sha256; each drawing is decoded once per process and kept (11 KB each,
    50 MB for all; decoding all takes about 0.6 s).

    Omniglot is MIT licensed, (c) 2015 Brenden Lake: mishield/assets/omniglot/OMNIGLOT_LICENSE.txt.
    """
    _omniglot_zips()  # checked on every call: the cache below holds the images, not the check
    members = _omniglot_index()
    parsed = [_omniglot_key(k) for k in members]
    known = tuple(sorted({a for a, _, _ in parsed}))
    chosen = set(_omniglot_alphabets(alphabets, known))
    if characters_per_alphabet is not None and characters_per_alphabet < 1:
        raise UsageError(f"`characters_per_alphabet` must be at least 1, got {characters_per_alphabet}.")
    # characterNN are numbered 1..n within each alphabet, so "the first N" is NN <= N.
    rows = [(k, key) for k, key in zip(members, parsed)
            if key[0] in chosen and (characters_per_alphabet is None or key[1] <= characters_per_alphabet)]
    ink = np.stack([_omniglot_ink(k) for k, _ in rows])
    alphabet, character, drawer = (np.array(col, dtype=np.int64) for col in zip(*[(known.index(a), c, d) for _, (a, c, d) in rows]))
    return OmniglotImages(ink, alphabet, character, drawer, tuple(k for k, _ in rows), known)


def omniglot_class_name(index: int, alphabet: str, character: int) -> str:
    """The class folder of a character: `007_japanese_katakana_08`. The zero-padded index first,
    so sorted folder names (ImageFolder's class order) are the class indices."""
    slug = "_".join("".join(c if c.isalnum() else " " for c in alphabet.lower()).split())
    return f"{index:03d}_{slug}_{character:02d}"


def _check_drawers(train_drawers: Sequence[int], val_drawers: Sequence[int]) -> tuple[list[int], list[int]]:
    train, val = sorted(int(d) for d in train_drawers), sorted(int(d) for d in val_drawers)
    for name, drawers in (("train_drawers", train), ("val_drawers", val)):
        if len(set(drawers)) != len(drawers) or not set(drawers) <= set(OMNIGLOT_DRAWERS):
            raise UsageError(f"`{name}` must be distinct drawer numbers in 1..20, got {drawers}.")
    if not train:
        raise UsageError("`train_drawers` is empty; name at least one drawer (1..20) for the training images.")
    if set(train) & set(val):
        raise UsageError(f"`train_drawers` and `val_drawers` share drawers {sorted(set(train) & set(val))}; "
                         "a drawing must be in one split only.")
    return train, val


def omniglot_pixels(ink: np.ndarray, size: int | None = 32, invert: bool = True) -> Image.Image:
    """One drawing as the 8-bit greyscale image `materialize_omniglot` writes (see there)."""
    strokes = ink if invert else ~ink
    img = Image.fromarray(np.where(strokes, 255, 0).astype(np.uint8), mode="L")
    if size is None or size == img.width:
        return img
    # Area averaging when shrinking: each pixel holds the fraction of its area the pen covered,
    # so a 1-2 px stroke at 32 px stays a grey line instead of breaking up (nearest) or ringing.
    resample = Image.Resampling.BOX if size < img.width else Image.Resampling.BILINEAR
    return img.resize((size, size), resample)


def materialize_omniglot(
    dest: str | Path,
    alphabets: str | Sequence[str] = "private",
    *,
    characters_per_alphabet: int | None = None,
    train_drawers: Sequence[int] = OMNIGLOT_TRAIN_DRAWERS,
    val_drawers: Sequence[int] = OMNIGLOT_VAL_DRAWERS,
    size: int | None = 32,
    invert: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write embedded Omniglot characters as an ImageFolder: dest/train/<class>/*.png, dest/val/<class>/*.png.

    A class is a character. `alphabets` picks whole alphabets: "private" (Japanese_(katakana),
    Korean, Sanskrit: 129 characters, the target's), "public" (Balinese, Early_Aramaic, Greek,
    Latin, Tagalog: 113, the attacker's prior's; no class shared with "private"), "all", or a list
    of names (OMNIGLOT_ROLES). `characters_per_alphabet` keeps each alphabet's first N characters.
    Drawings of `train_drawers` (default 1-15) go to train/, of `val_drawers` (16-20) to val/
    (none: no val/ folder); the drawer is the DRAWER of the original file name ID_DRAWER.png,
    which each written file keeps. Class folders are `omniglot_class_name(i, alphabet, character)`
    for i over the characters sorted by alphabet name and character number, so ImageFolder's
    sorted class list is that index.

    Polarity: the files hold black strokes on white; by default (`invert`) the images are written
    as bright strokes (255) on black (0), the MNIST convention. Black is what padding adds: zero
    padding in convolutions, and the fill of affine augmentation and of the attack's crops, so
    with a black background the padding looks like more background instead of a bright frame;
    the sparse bright strokes are also what the other embedded data (Fashion-MNIST's dark
    background) and the DCGAN prior are used to. `invert=False` keeps the files' polarity.
    `size`: the written side in px (default 32, the attack's and prior's resolution; None keeps
    105), shrunk by area averaging. Deterministic: the same arguments write the same bytes.
    Returns `dest`.
    """
    if size is not None and not 8 <= int(size) <= 512:
        raise UsageError(f"`size` must be between 8 and 512 px (or None for the native 105), got {size}.")
    train, val = _check_drawers(train_drawers, val_drawers)
    images = load_embedded_omniglot(alphabets, characters_per_alphabet=characters_per_alphabet)
    dest = Path(dest)
    _clear_splits(dest, overwrite)
    chars = sorted({(images.alphabets[a], int(c)) for a, c in zip(images.alphabet, images.character)})
    folders = {key: omniglot_class_name(i, *key) for i, key in enumerate(chars)}
    for split in ("train", *(["val"] if val else [])):
        for name in folders.values():
            (dest / split / name).mkdir(parents=True, exist_ok=True)
    splits = {**dict.fromkeys(train, "train"), **dict.fromkeys(val, "val")}
    for ink, a, c, d, path in zip(images.ink, images.alphabet, images.character, images.drawer, images.paths):
        if int(d) in splits:
            folder = dest / splits[int(d)] / folders[(images.alphabets[a], int(c))]
            omniglot_pixels(ink, size, invert).save(folder / path.rsplit("/", 1)[1], format="PNG")
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
        return hold_out(DataSplits(train=train, val=[], classes=classes), val_fraction, seed)
    return DataSplits(train=train, val=val, classes=classes)


def has_validation(data_dir: str | Path, val_dir: str | Path | None = None) -> bool:
    """Whether `load_image_folders(data_dir, val_dir)` finds validation images without a split."""
    data_dir = Path(data_dir)
    return val_dir is not None or ((data_dir / "train").is_dir() and (data_dir / "val").is_dir())


def resolve_val_fraction(data_dir: str | Path, val_dir: str | Path | None = None,
                         val_fraction: float | None = None, *, val_data_option: bool = False) -> float | None:
    """`val_fraction`, or DEFAULT_VAL_FRACTION when nothing else gives validation images, so that
    natural accuracy is always measured; says so, since a model trained on all of `data_dir` has
    seen those images (its accuracy on them is then an overestimate). `val_data_option`: the caller
    also takes validation images from elsewhere (`harden`'s `val_data`), which the advice then names.
    Parameters are named in backticks; the command line shows them as its flags."""
    if val_fraction is not None or has_validation(data_dir, val_dir):
        return val_fraction
    _log.warning(
        "%s has no val/ folder: holding out a seeded %d %% of it to measure natural accuracy "
        "(choose the share with `val_fraction`, or give validation images in a val/ folder%s; if the model was "
        "trained on these images, the accuracy is an overestimate).", data_dir, round(100 * DEFAULT_VAL_FRACTION),
        " or with `val_data`" if val_data_option else "",
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
                "check `input_size`.", current, native,
            )
        return loaded
    if size != current:
        _log.warning(
            "%s does not record its input size; using the data's %d px instead of the architecture's "
            "default %d px (pass `input_size` to choose).",
            loaded.source or loaded.arch, size, current,
        )
    return dataclasses.replace(loaded, preprocessing=loaded.preprocessing.with_input_size(size))


def state_normalisation(loaded, given: bool) -> None:
    """Say which mean/std `loaded` is read with when its file records none (a plain state dict, a
    pickled module): its architecture's defaults, ImageNet's for most. A wrong guess leaves the model
    at chance, so it must never be silent (`harden` then refuses to fine-tune such a model)."""
    if given or loaded.kind in ("mishield", "spec"):  # a mishield file records them; a spec is untrained
        return
    pre = loaded.preprocessing
    _log.warning(
        "%s does not record its normalisation; assuming mean %s and std %s (the architecture's default); "
        "pass `mean` and `std` to choose.", loaded.source or loaded.arch,
        ",".join(f"{v:g}" for v in pre.mean), ",".join(f"{v:g}" for v in pre.std),
    )


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


def train_transform(pre: Preprocessing, erase: tuple[float, float, float] | None = None,
                    augmentation: str = "photo", noise: float = 0.0) -> Callable:
    """The training augmentation `augmentation` names (AUGMENTATIONS: "photo", the paper's
    fine-tuning augmentation after PPA's training recipe, or "glyph" for drawn characters),
    optionally Gaussian pixel noise of std `noise` before normalisation (`GaussianNoise`), and
    optionally random erasing as a defence (`erase` = (p, min_area, max_area); see `random_erasing`)."""
    if augmentation not in AUGMENTATIONS:
        raise UsageError(f"`augmentation` must be one of {', '.join(AUGMENTATIONS)}, got {augmentation!r}.")
    steps = list(AUGMENTATIONS[augmentation](pre).transforms)
    if noise:  # in pixel units: before the final normalisation
        steps.insert(len(steps) - 1, GaussianNoise(noise))
    if erase is not None:
        steps.append(random_erasing(*erase))
    return T.Compose(steps)


def photo_train_transform(pre: Preprocessing) -> Callable:
    """Photos: a mild random resized crop, colour jitter and a horizontal mirror."""
    size = tuple(pre.input_size[1:])
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.85, 1.0), ratio=(1.0, 1.0), interpolation=_interpolation(pre)),
        T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.1, hue=0.1),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        _normalize(pre),
    ])  # fmt: skip


def random_erasing(p: float, min_area: float, max_area: float) -> Callable:
    """MIDRE's defence (random erasing, TMLR 2025): with probability `p` one rectangle covering a
    uniform fraction in [`min_area`, `max_area`] of the image is erased.

    It runs after normalisation and fills with 0 there, i.e. with the normalisation mean colour:
    the value that carries no information about the private image in the model's own input
    coordinates (black, 0 before normalisation, would be a strong artificial edge on dark-on-light
    data, and noise would add a texture for the model to learn). The aspect ratio is
    torchvision's default range (0.3, 3.3). A rectangle that does not fit is redrawn, up to ten
    times before the image is left whole; at these areas each draw fits with probability about
    0.7, so that happens to about one image in 10^5.
    """
    return T.RandomErasing(p=p, scale=(min_area, max_area), ratio=(0.3, 3.3), value=0.0)


class GaussianNoise:
    """Adds N(0, std^2) noise to every pixel of a [0, 1] image tensor (no clipping), a fresh draw per image.

    For evaluation models (`train-eval`): an evaluator trained on noisy images relies less on the
    small, precise pixel patterns an attack plants through the target (the reasoning of training
    with noise for robustness, Cohen et al., ICML 2019); measured in docs/audit.md ("Evaluation
    models"), perturbations made against the target fooled it 5-8 points less often. A class
    rather than a lambda, so data loader workers can pickle it.
    """

    def __init__(self, std: float):
        self.std = float(std)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.std * torch.randn_like(x)

    def __repr__(self) -> str:
        return f"GaussianNoise(std={self.std})"


def glyph_train_transform(pre: Preprocessing) -> Callable:
    """A training augmentation for drawn characters (Omniglot): `augmentation="glyph"`.

    The photo augmentation suits photos; for characters its mirror can turn one character into
    another and its colour jitter varies only stroke brightness, which carries no class. This
    one jitters the geometry a little (rotation 10 degrees, shift 8 %, scale 0.9-1.1, shear 8
    degrees: the variation between two people's drawings of one character) and fills what it
    uncovers with black, the background of `materialize_omniglot`'s images. Measured on the 129
    private Omniglot characters at 32 px (bench/omniglot_sizing.py, one seed, 30 epochs of timm's
    test_resnet): 93.5 % validation accuracy against 87.8 % with `train_transform` (87.9 % with
    its flip removed, 84.0 % without augmentation); mishield's plain CNN evaluator, 15 epochs:
    95.0 % against 89.5 %.
    """
    return T.Compose([
        T.RandomAffine(degrees=10, translate=(0.08, 0.08), scale=(0.9, 1.1), shear=8, fill=0),
        T.Resize(tuple(pre.input_size[1:]), interpolation=_interpolation(pre)),
        T.ToTensor(),
        _normalize(pre),
    ])  # fmt: skip


# The training augmentations a recipe can name; the photo one is the default everywhere.
AUGMENTATIONS: dict[str, Callable[[Preprocessing], Callable]] = {"photo": photo_train_transform, "glyph": glyph_train_transform}


def eval_transform(pre: Preprocessing) -> Callable:
    size = tuple(pre.input_size[1:])
    return T.Compose([T.Resize(size, interpolation=_interpolation(pre)), T.ToTensor(), _normalize(pre)])


# ---------------------------------------------------------------------------------------------
# Fingerprints and native size (provenance of evaluation models and priors; docs/audit.md "Trust checks")

# Allowed prior resolutions (mishield.models.dcgan); the default input size of `prior train`
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
