"""Does training the evaluation model with Gaussian pixel noise make it harder to fool? (docs/audit.md, "Evaluation models")

    python bench/evaluator_noise.py --data PRIVATE_DIR --target TARGET.pt --prior PRIOR.safetensors --out DIR
    python bench/evaluator_noise.py ... --noise 0 0.1 0.25 --epochs 10 --preset default

One evaluation model per noise level (`mishield train-eval --noise`, mishield's plain CNN, the same
seed), then two measurements against the same target:

1. **Transfer with a known answer.** Private validation images of class y, perturbed by PGD on the
   target's Poincaré loss towards a random other class t (L-inf radius 8/255 and 16/255, 50 steps
   of 1/255): the image still shows y. Among the images that fooled the target, the share each
   evaluator also files under t is how often an attack through the target fools it.
2. **The audit.** One `mishield.audit` of the target with every evaluator: each evaluator's attack
   accuracy and the share of its hits that the KNN judge in the prior discriminator's features
   rejects (`metrics.evaluators[].false_positive_share`), the estimate of false positives.

Prints a markdown table; the clean accuracy on the validation images is the price of the noise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch

# after the path: the checkout's mishield; at the top so that tests/test_bench.py sees a moved name
from mishield.attack.poincare import poincare_loss
from mishield.audit.config import AuditConfig
from mishield.audit.stats import wilson_interval
from mishield.data import ImageDataset, load_image_folders
from mishield.models import load_model
from mishield.training.evaluator import EvalModelConfig, train_eval_model


def _pixels(items, size: int):
    from torchvision import transforms as T

    loader = torch.utils.data.DataLoader(ImageDataset(items, T.Compose([T.Resize(size), T.ToTensor()]), channels=1), batch_size=512)
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def _logits(loaded, x: torch.Tensor) -> torch.Tensor:
    pre = loaded.preprocessing
    mean, std = torch.tensor(pre.mean).view(1, -1, 1, 1), torch.tensor(pre.std).view(1, -1, 1, 1)
    return loaded.model((x.expand(-1, pre.input_size[0], -1, -1) - mean) / std)


def adversarial_images(target, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 50, seed: int = 0):
    """PGD (L-inf, step 1/255) on the target's Poincaré loss towards a random class t != y; returns (images, t)."""
    t = (y + torch.randint(1, int(y.max()) + 1, y.shape, generator=torch.Generator().manual_seed(seed))) % (int(y.max()) + 1)
    delta = torch.zeros_like(x, requires_grad=True)
    for _ in range(steps):
        (grad,) = torch.autograd.grad(poincare_loss(_logits(target, (x + delta).clamp(0, 1)), t).sum(), delta)
        delta = (delta - grad.sign() / 255).clamp(-eps, eps).detach().requires_grad_(True)
    return (x + delta).clamp(0, 1).detach(), t


def transfer(target, evaluators: dict, x, y) -> dict:
    rows = {name: {} for name in evaluators}
    with torch.no_grad():
        for name, ev in evaluators.items():
            rows[name]["clean_acc"] = float((_logits(ev, x).argmax(1) == y).float().mean())
    for eps in (8, 16):
        adv, t = adversarial_images(target, x, y, eps / 255)
        with torch.no_grad():
            fooled_target = _logits(target, adv).argmax(1) == t
            for name, ev in evaluators.items():
                k, n = int((_logits(ev, adv).argmax(1)[fooled_target] == t[fooled_target]).sum()), int(fooled_target.sum())
                rows[name][f"eps{eps}"] = (k, n)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="private ImageFolder with train/ and val/")
    parser.add_argument("--target", type=Path, required=True)
    parser.add_argument("--prior", type=Path, required=True, help="a prior made by `mishield prior train` (it keeps the discriminator)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.25])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import mishield

    args.out.mkdir(parents=True, exist_ok=True)
    files = {}
    for noise in args.noise:
        files[f"noise {noise:g}"] = path = args.out / f"eval-noise{noise:g}.pt"
        if not path.exists():
            t0 = time.perf_counter()
            train_eval_model(args.data, path, config=EvalModelConfig(epochs=args.epochs, lr=3e-3, batch_size=32, seed=1, workers=0,
                                                                      noise=noise, device="cpu"))  # fmt: skip
            print(f"trained {path.name} in {time.perf_counter() - t0:.0f} s", flush=True)
    target = load_model(args.target)
    target.model.eval()
    evaluators = {name: load_model(p) for name, p in files.items()}
    for ev in evaluators.values():
        ev.model.eval()
    x, y = _pixels(load_image_folders(args.data).val, target.preprocessing.input_size[1])
    rows = transfer(target, evaluators, x, y)
    config = AuditConfig.preset(args.preset, batch_size=args.batch_size, seed=0, device="cpu", overwrite=True)
    report = mishield.audit([args.target], data=args.data, prior=args.prior, eval_model=list(files.values()), config=config,
                            out=args.out / "audit")  # fmt: skip
    for summary, name in zip(report.models[0].metrics["evaluators"], files):
        rows[name]["audit"] = {k: summary.get(k) for k in ("attack_acc1", "attack_acc1_interval", "false_positive_share",
                                                            "false_positive_share_interval")}  # fmt: skip
    ceiling = report.feature_extractors[0].get("knn_judge_ceiling")
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    print(f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; KNN judge ({report.feature_extractors[0]['extractor']}) ceiling "
          f"{100 * ceiling:.1f} %; target {args.target.name}, preset {args.preset}")  # fmt: skip
    print("| evaluator | clean acc | fooled by transfer, 8/255 | 16/255 | audit: attack acc @1 | false-positive share (KNN judge) |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        cells = []
        for eps in (8, 16):
            k, n = r[f"eps{eps}"]
            lo, hi = wilson_interval(k, n)
            cells.append(f"{100 * k / max(n, 1):.1f} % ({k}/{n}; {100 * lo:.0f}-{100 * hi:.0f})")
        a = r["audit"]
        fp, fpi = a["false_positive_share"], a["false_positive_share_interval"] or {}
        print(f"| {name} | {100 * r['clean_acc']:.1f} % | {cells[0]} | {cells[1]} | {100 * a['attack_acc1']:.1f} % "
              f"({100 * a['attack_acc1_interval']['low']:.0f}-{100 * a['attack_acc1_interval']['high']:.0f}) | "
              + ("–" if fp is None else f"{100 * fp:.1f} % ({100 * fpi['low']:.0f}-{100 * fpi['high']:.0f})") + " |")


if __name__ == "__main__":
    main()
