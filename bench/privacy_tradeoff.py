"""Privacy/utility trade-off of every defence on the full Fashion-MNIST, with the demo's protocol.

    python bench/privacy_tradeoff.py /usr/share/datasets/fashion-mnist --out /tmp/tradeoff \
        --train-per-class 1000 --epochs 6 --seeds 3 --markdown docs/RESULTS.md

FOLDER holds the four IDX files (`apt-get install dataset-fashion-mnist` puts them under
/usr/share/datasets/fashion-mnist/; .gz or not). Protocol (as `mishield demo`, docs/demo.md):
classes 0-4 private, 5-9 public (the prior's); timm:test_resnet at 32 px; per seed the target
and its defended versions are trained with the same epoch budget, then audited in ONE
`mishield.audit` call (the undefended model first: every paired difference is against it, same
pool and crops). The prior and the evaluation model are trained once. Defences:

* none: the target; RoLSS / SSF: surgery on the trained target, then `epochs // 2` fine-tuning
  epochs; TTS: RoLSS trained two-stage from scratch (M = epochs // 3 with skips);
  BiDO: the target's training with BiDO's HSIC terms; BiDO + RoLSS: TTS with BiDO.
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NAMES = ("none", "RoLSS", "SSF", "TTS", "BiDO", "BiDO+RoLSS")


def read_idx(folder: Path, stem: str) -> np.ndarray:
    path = next((p for p in (folder / f"{stem}.gz", folder / stem) if p.exists()), None)
    if path is None:
        sys.exit(f"error: {folder} has no {stem}[.gz]; install dataset-fashion-mnist or pass the IDX folder.")
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * dims).reshape(shape)


def write_folders(idx: Path, out: Path, train_per_class: int, val_per_class: int) -> tuple[Path, Path]:
    from PIL import Image

    from mishield.data import load_embedded_fashion_mnist

    names = load_embedded_fashion_mnist().class_names
    xs, ys = read_idx(idx, "train-images-idx3-ubyte"), read_idx(idx, "train-labels-idx1-ubyte")
    xt, yt = read_idx(idx, "t10k-images-idx3-ubyte"), read_idx(idx, "t10k-labels-idx1-ubyte")
    for role, classes in (("private", range(5)), ("public", range(5, 10))):
        for split, x, y, cap in (("train", xs, ys, train_per_class), ("val", xt, yt, val_per_class)):
            for c in classes:
                folder = out / role / split / names[c]
                if folder.is_dir() and len(list(folder.iterdir())) == min(cap, int((y == c).sum())):
                    continue
                folder.mkdir(parents=True, exist_ok=True)
                for n, i in enumerate(np.flatnonzero(y == c)[:cap]):
                    Image.fromarray(x[i], mode="L").save(folder / f"{n:05d}.png")
    return out / "private", out / "public"


def train_models(private: Path, out: Path, seed: int, epochs: int) -> list[Path]:
    """The undefended target and its five defended versions for one seed (files, in NAMES order)."""
    import torch

    import mishield
    from mishield.data import load_image_folders
    from mishield.demo import BATCH_SIZE, LR, RESOLUTION, TARGET_ARCH
    from mishield.training import BiDOConfig, fit

    paths = [out / f"seed{seed}-{n.replace('+', '-')}.pt" for n in NAMES]
    splits = load_image_folders(private)
    common = {"data": private, "batch_size": BATCH_SIZE, "device": "cpu", "workers": 0, "seed": seed, "overwrite": True}
    spec = {"load_options": {"num_classes": 5, "input_size": RESOLUTION}}
    for path, bido in ((paths[0], None), (paths[4], BiDOConfig())):
        if path.exists():
            continue
        torch.manual_seed(seed)
        loaded = mishield.load_model(TARGET_ARCH, num_classes=5, input_size=RESOLUTION)
        fit(loaded.model, splits, loaded.preprocessing, epochs=epochs, lr=LR, batch_size=BATCH_SIZE, device="cpu",
            seed=seed, workers=0, bido=bido)
        mishield.save_model(path, loaded.model.eval(), arch=TARGET_ARCH, num_classes=5, surgery=None,
                            preprocessing=loaded.preprocessing, overwrite=True)
    m = max(1, epochs // 3)
    jobs = [
        (paths[1], {"model": paths[0], "method": "rolss", "schedule": "finetune", "epochs": max(1, epochs // 2), "lr": LR / 10}),
        (paths[2], {"model": paths[0], "method": "ssf", "schedule": "finetune", "epochs": max(1, epochs // 2), "lr": LR / 10}),
        (paths[3], dict(model=TARGET_ARCH, method="rolss", schedule="tts", epochs=epochs - m, stage1_epochs=m, lr=LR, **spec)),
        (paths[5], dict(model=TARGET_ARCH, method="rolss", schedule="tts", epochs=epochs - m, stage1_epochs=m, lr=LR,
                        bido=True, **spec)),
    ]
    for path, kwargs in jobs:
        if not path.exists():
            mishield.harden(out=path, **common, **kwargs)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("idx_folder", type=Path)
    ap.add_argument("--out", type=Path, default=Path("tradeoff"))
    ap.add_argument("--train-per-class", type=int, default=1000)
    ap.add_argument("--val-per-class", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--attack", default="{}", help='JSON overrides of the default attack, e.g. \'{"samples": 200}\'')
    ap.add_argument("--markdown", type=Path, help="write the results table here (docs/RESULTS.md)")
    args = ap.parse_args()

    import torch

    import mishield
    from mishield.demo import BATCH_SIZE, LR, RESOLUTION, demo_table
    from mishield.training.evaluator import train_eval_model
    from mishield.training.prior import PriorTrainingConfig, train_prior

    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    private, public = write_folders(args.idx_folder, args.out / "data", args.train_per_class, args.val_per_class)
    prior, evaluator = args.out / "prior.safetensors", args.out / "eval.pt"
    if not prior.exists():
        train_prior(public, prior, PriorTrainingConfig(resolution=RESOLUTION, latent_dim=64, width=32, epochs=max(5, 2 * args.epochs)))
    if not evaluator.exists():
        train_eval_model(private, evaluator, input_size=RESOLUTION, epochs=args.epochs, lr=LR, batch_size=BATCH_SIZE, seed=99, workers=0)
    per_seed = []
    for seed in range(args.seeds):
        models = train_models(private, args.out, seed, args.epochs)
        report = mishield.audit(models, data=private, prior=prior, eval_model=evaluator, out=args.out / f"audit-seed{seed}",
                                attack={"seed": seed, **json.loads(args.attack)}, device="cpu", overwrite=True)
        rows = demo_table(report.to_dict())
        for name, row in zip(NAMES, rows):
            row["model"] = name
        per_seed.append(rows)
        print(json.dumps({"seed": seed, "rows": rows}), flush=True)
    seconds = time.perf_counter() - t0
    doc = {"args": {k: str(v) for k, v in vars(args).items()}, "seconds": seconds, "per_seed": per_seed,
           "hardware": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
           "software": f"Python {platform.python_version()}, torch {torch.__version__}, mishield {mishield.__version__}",
           "command": " ".join(["python", "bench/privacy_tradeoff.py", *sys.argv[1:]])}
    (args.out / "results.json").write_text(json.dumps(doc, indent=1))
    if args.markdown:
        args.markdown.write_text(markdown(doc))


def markdown(doc: dict) -> str:
    """The results table: per defence the mean over seeds, and every seed's row with its intervals."""
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}"

    lines = ["| defence | seeds | natural acc % (mean) | attack acc@1 % (mean) | per seed: attack acc@1 % [95 % CI]; paired diff pts [95 % CI] | Δ (mean) |",
             "|---|---|---|---|---|---|"]
    for i, name in enumerate(NAMES):
        rows = [s[i] for s in doc["per_seed"]]
        nat = np.mean([r["natural_acc"] for r in rows])
        att = np.mean([r["attack_acc1"] for r in rows])
        deltas = [r["delta"] for r in rows if r["delta"] is not None]
        cells = []
        for r in rows:
            cell = f"{pct(r['attack_acc1'])} [{pct(r['attack_acc1_ci95'][0])}, {pct(r['attack_acc1_ci95'][1])}]"
            if r["paired_diff"] is not None:
                lo, hi = r["paired_diff_ci95"]
                cell += f"; {100 * r['paired_diff']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
            cells.append(cell)
        lines.append(f"| {name} | {len(rows)} | {pct(nat)} | {pct(att)} | {' / '.join(cells)} | "
                     f"{'n/a' if not deltas else f'{np.mean(deltas):.2f}'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
