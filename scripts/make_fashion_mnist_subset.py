"""Build the Fashion-MNIST subset embedded in mishield (docs/architecture.md §8).

Reads the full IDX files that Debian's `dataset-fashion-mnist` installs and writes
`mishield/assets/fashion_mnist_subset.npz` (uint8 28x28; per class 300 train + 100 test images)
together with the dataset's MIT licence notice. The selection is a seeded permutation per class,
so rerunning the script selects the same images in the same order.

    python scripts/make_fashion_mnist_subset.py [--source DIR] [--train-per-class 300] [--test-per-class 100]
"""

from __future__ import annotations

import argparse
import gzip
import io
import struct
from pathlib import Path

import numpy as np

DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
ASSETS = Path(__file__).resolve().parent.parent / "mishield" / "assets"

# Folder-safe names; the numeric prefix keeps alphabetical ImageFolder order equal to the
# original Fashion-MNIST label order.
CLASS_NAMES = [
    "0_tshirt_top", "1_trouser", "2_pullover", "3_dress", "4_coat",
    "5_sandal", "6_shirt", "7_sneaker", "8_bag", "9_ankle_boot",
]

LICENSE_TEXT = """\
The images in fashion_mnist_subset.npz are a subset of Fashion-MNIST
(https://github.com/zalandoresearch/fashion-mnist), by Zalando Research,
distributed under the MIT licence reproduced below. mishield ships 300 training and
100 test images per class, chosen by scripts/make_fashion_mnist_subset.py.

The MIT License (MIT) Copyright © 2017 Zalando SE, https://tech.zalando.com

Permission is hereby granted, free of charge, to any person obtaining a copy of this
software and associated documentation files (the "Software"), to deal in the Software
without restriction, including without limitation the rights to use, copy, modify, merge,
publish, distribute, sublicense, and/or sell copies of the Software, and to permit persons
to whom the Software is furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or
substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED,
INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR
PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE
FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR
OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER
DEALINGS IN THE SOFTWARE.
"""


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (optionally gzipped): big-endian magic, dims, then uint8 data."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    return data.reshape(dims)


def _find(source: Path, stem: str) -> Path:
    for candidate in (source / f"{stem}.gz", source / stem):
        if candidate.exists():
            return candidate
    raise SystemExit(f"{stem}(.gz) not found under {source}; install Debian's dataset-fashion-mnist or pass --source.")


def select(images: np.ndarray, labels: np.ndarray, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    keep = []
    for c in range(len(CLASS_NAMES)):
        idx = np.flatnonzero(labels == c)
        keep.append(np.sort(rng.permutation(idx)[:per_class]))
    order = np.concatenate(keep)
    return images[order].copy(), labels[order].astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--out", type=Path, default=ASSETS / "fashion_mnist_subset.npz")
    parser.add_argument("--train-per-class", type=int, default=300)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    train_x, train_y = select(
        read_idx(_find(args.source, "train-images-idx3-ubyte")),
        read_idx(_find(args.source, "train-labels-idx1-ubyte")),
        args.train_per_class,
        args.seed,
    )
    test_x, test_y = select(
        read_idx(_find(args.source, "t10k-images-idx3-ubyte")),
        read_idx(_find(args.source, "t10k-labels-idx1-ubyte")),
        args.test_per_class,
        args.seed + 1,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        train_images=train_x,
        train_labels=train_y,
        test_images=test_x,
        test_labels=test_y,
        class_names=np.array(CLASS_NAMES),
    )
    args.out.write_bytes(buf.getvalue())
    (args.out.parent / "FASHION_MNIST_LICENSE.txt").write_text(LICENSE_TEXT, encoding="utf-8")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): train {train_x.shape}, test {test_x.shape}")


if __name__ == "__main__":
    main()
