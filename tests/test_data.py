"""Data loading: the embedded Fashion-MNIST subset, ImageFolder layouts, transforms, bad data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mishield.data import (
    DataSplits,
    ImageDataset,
    check_num_classes,
    eval_transform,
    load_embedded_fashion_mnist,
    load_image_folders,
    materialize_fashion_mnist,
    train_transform,
)
from mishield.errors import BadInputError, UsageError
from mishield.preprocessing import Preprocessing


def test_embedded_subset_shapes_and_balance():
    s = load_embedded_fashion_mnist()
    assert s.train_images.shape == (3000, 28, 28) and s.train_images.dtype == np.uint8
    assert s.test_images.shape == (1000, 28, 28)
    assert np.bincount(s.train_labels).tolist() == [300] * 10
    assert np.bincount(s.test_labels).tolist() == [100] * 10
    assert len(s.class_names) == 10 and s.class_names == sorted(s.class_names)
    # real images, not blanks: Fashion-MNIST has dark backgrounds and bright garments
    assert 40 < s.train_images.mean() < 110 and s.train_images.max() == 255
    assert not (s.train_images[0] == s.train_images[1]).all()


def test_licence_ships_with_the_data():
    text = (Path(__import__("mishield").__file__).parent / "assets" / "FASHION_MNIST_LICENSE.txt").read_text()
    assert "Zalando SE" in text and "MIT" in text and "Permission is hereby granted" in text


def test_fixture_is_an_image_folder(fmnist_dir):
    splits = load_image_folders(fmnist_dir)
    assert len(splits.classes) == 10
    assert len(splits.train) == 3000 and len(splits.val) == 1000
    assert {label for _, label in splits.val} == set(range(10))
    # the label is the index of the (sorted) class folder name
    path, label = splits.train[0]
    assert path.parent.name == splits.classes[label]


def test_materialize_class_subset_and_caps(tmp_path):
    dest = materialize_fashion_mnist(tmp_path / "pub", classes=[7, 5], train_per_class=4, val_per_class=2)
    splits = load_image_folders(dest)
    assert splits.classes == ["5_sandal", "7_sneaker"]
    assert len(splits.train) == 8 and len(splits.val) == 4
    with pytest.raises(UsageError):
        materialize_fashion_mnist(dest, classes=[1])  # refuses to mix into existing files
    materialize_fashion_mnist(dest, classes=[1], train_per_class=1, val_per_class=1, overwrite=True)
    assert load_image_folders(dest).classes == ["1_trouser"]
    with pytest.raises(UsageError):
        materialize_fashion_mnist(tmp_path / "x", classes=[10])


def _small_folder(root: Path, classes=("a", "b"), n=5, size=12) -> Path:
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.jpg")
    return root


def test_val_fraction_split_is_seeded_stratified_and_disjoint(tmp_path):
    root = _small_folder(tmp_path / "d", n=10)
    a = load_image_folders(root, val_fraction=0.3, seed=1)
    b = load_image_folders(root, val_fraction=0.3, seed=1)
    c = load_image_folders(root, val_fraction=0.3, seed=2)
    assert a == b and a.val != c.val
    assert len(a.val) == 6 and len(a.train) == 14
    assert not set(a.train) & set(a.val)
    assert sorted(label for _, label in a.val) == [0, 0, 0, 1, 1, 1]
    only_train = load_image_folders(root)
    assert only_train.val == [] and len(only_train.train) == 20


def test_explicit_val_dir_uses_the_training_class_index(tmp_path):
    train = _small_folder(tmp_path / "tr", classes=("a", "b", "c"), n=2)
    val = _small_folder(tmp_path / "va", classes=("c",), n=2)
    s = load_image_folders(train, val_dir=val)
    assert {label for _, label in s.val} == {2}
    bad_val = _small_folder(tmp_path / "vb", classes=("z",), n=1)
    with pytest.raises(BadInputError, match="classes the training data lacks"):
        load_image_folders(train, val_dir=bad_val)
    with pytest.raises(UsageError):
        load_image_folders(train, val_dir=val, val_fraction=0.2)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda r: r / "missing", "does not exist"),
        (lambda r: (r / "empty").mkdir() or r / "empty", "no class sub-folders"),
        (lambda r: (r / "e" / "cls").mkdir(parents=True) or r / "e", "contains no images"),
        (lambda r: ((r / "t" / "c").mkdir(parents=True), (r / "t" / "c" / "x.txt").write_text("hi"))
         and r / "t", "contains no images"),
    ],
)
def test_bad_folders(tmp_path, make, match):
    with pytest.raises(BadInputError, match=match):
        load_image_folders(make(tmp_path))


@pytest.mark.parametrize("corruption", ["garbage", "truncated"])
def test_corrupt_image_is_named(tmp_path, corruption):
    root = _small_folder(tmp_path / "d", n=3)
    png = root / "b" / "bad.png"
    Image.fromarray(np.full((16, 16), 128, dtype=np.uint8)).save(png)
    data = png.read_bytes()
    png.write_bytes(b"not an image at all" if corruption == "garbage" else data[: len(data) // 2])
    with pytest.raises(BadInputError, match="bad.png") as info:
        load_image_folders(root)
    assert "\n" not in str(info.value)
    # the lazy path (verify=False) still names the file when it is decoded
    splits = load_image_folders(root, verify=False)
    ds = ImageDataset(splits.train, eval_transform(Preprocessing((3, 8, 8))))
    bad = next(i for i, (p, _) in enumerate(ds.items) if p.name == "bad.png")
    with pytest.raises(BadInputError, match="bad.png"):
        ds[bad]


def test_class_count_mismatch_offers_reset_head():
    splits = DataSplits(train=[], val=[], classes=["a", "b", "c"])
    check_num_classes(splits, 3)
    check_num_classes(splits, None)
    with pytest.raises(BadInputError, match="`reset_head`"):
        check_num_classes(splits, 10)


def test_transforms_grayscale_to_rgb_and_shapes(fmnist_dir):
    splits = load_image_folders(fmnist_dir / "train")
    pre = Preprocessing((3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x, y = ImageDataset(splits.train[:1], train_transform(pre))[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    assert -1.0 <= x.min() and x.max() <= 1.0
    x_eval, _ = ImageDataset(splits.train[:1], eval_transform(pre))[0]
    # grayscale replicated into 3 channels
    assert torch.equal(x_eval[0], x_eval[1]) and torch.equal(x_eval[1], x_eval[2])
    # eval is deterministic, train is augmented
    assert torch.equal(x_eval, ImageDataset(splits.train[:1], eval_transform(pre))[0][0])
    one = Preprocessing((1, 16, 16))
    x1, _ = ImageDataset(splits.train[:1], eval_transform(one), channels=1)[0]
    assert x1.shape == (1, 16, 16)


def test_train_transform_follows_the_paper_recipe():
    tf = train_transform(Preprocessing((3, 64, 64)))
    crop, jitter, flip = tf.transforms[:3]
    assert crop.size == (64, 64) and crop.scale == (0.85, 1.0) and crop.ratio == (1.0, 1.0)
    assert jitter.brightness == (0.8, 1.2) and jitter.contrast == (0.8, 1.2)
    assert jitter.saturation == (0.9, 1.1) and jitter.hue == (-0.1, 0.1)
    assert flip.p == 0.5
    # a random image stays close to itself under the mild augmentation (no heavy crops)
    img = Image.fromarray(np.kron(np.eye(4, dtype=np.uint8) * 255, np.ones((16, 16), np.uint8)))
    plain = eval_transform(Preprocessing((1, 64, 64), mean=(0,), std=(1,)))(img)
    torch.manual_seed(0)
    aug = train_transform(Preprocessing((1, 64, 64), mean=(0,), std=(1,)))
    sims = []
    for _ in range(10):
        x = aug(img)
        flipped = torch.flip(x, dims=[-1])
        best = max(torch.nn.functional.cosine_similarity(v.flatten(), plain.flatten(), dim=0) for v in (x, flipped))
        sims.append(float(best))
    assert min(sims) > 0.6
