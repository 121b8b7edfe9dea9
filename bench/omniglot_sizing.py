"""Sizing an Omniglot demo (issue 23): what each stage costs and what it measures, on a CPU.

What it measures, at 32 px on the embedded Omniglot (`mishield.data.materialize_omniglot`: the
129 private characters of Japanese (katakana), Korean and Sanskrit, drawers 1-15 train and
16-20 validation; the 113 public characters of the other five alphabets, all 20 drawers, for
the prior), each through the public API as the demo chains it (mishield/demo.py):

* `target`: a target architecture trained with `mishield.training.fit` (Adam, the recipe's
  MultiStep schedule): validation accuracy after every epoch and seconds per epoch, under one
  of the training augmentations of AUGMENTATIONS (`photo` is mishield's `train_transform`,
  with its horizontal flip and colour jitter; the others replace it for this run only);
* `eval`: an evaluation model trained with `train_eval_model`: accuracy vs epochs at 32 px;
* `prior`: a DCGAN prior trained with `train_prior` on the public alphabets: its samples grid
  and the audit's prior-quality figure (`nn_ratio`, `mishield.audit.trust.prior_quality`, in a
  given evaluation model's features), with seconds per epoch;
* `harden`: a RoLSS copy (`mishield.harden`, schedule tts from scratch or finetune of a target);
* `audit`: `mishield.audit` of one or more models on N classes spread evenly over the private
  classes at a budget: attack accuracy @1 with its class-bootstrap interval, the selection-only
  baseline, how many classes were reached, the per-class spread (sd of per-class accuracy) and
  the half-width it predicts for all 129 classes (1.96 sd / sqrt(129)), the paired difference
  against the first model with its interval and per-class sd, the prior's `nn_ratio`, seconds;
* `table`: the markdown tables of everything recorded so far.

Every run appends one JSON line to OUT/results.jsonl with its settings, figures, wall seconds,
torch threads and the load average before and after (other people share the CPU: timings are
upper bounds, accuracies and intervals are what matter). Models, priors and audits stay in OUT.

    python bench/omniglot_sizing.py data
    python bench/omniglot_sizing.py target --arch test_resnet --epochs 30 --aug glyph
    python bench/omniglot_sizing.py eval --arch plain_cnn --epochs 15
    python bench/omniglot_sizing.py prior --epochs 10 --eval-model OUT/models/eval-plain_cnn-e15.pt
    python bench/omniglot_sizing.py harden --target test_resnet-glyph-e30 --schedule finetune --epochs 3
    python bench/omniglot_sizing.py audit --models test_resnet-glyph-e30,rolss-ft-... --classes 30 --preset ci \\
        --prior OUT/priors/prior-e10-w32-z64.safetensors --eval-model OUT/models/eval-plain_cnn-e15.pt
    python bench/omniglot_sizing.py table
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mishield
from mishield.data import (
    eval_transform,
    glyph_train_transform,
    load_image_folders,
    materialize_omniglot,
    train_transform,
)

DEFAULT_OUT = ROOT / "out" / "omniglot-sizing"
RESOLUTION = 32
ARCHS = {
    "test_resnet": "timm:test_resnet",  # the Fashion-MNIST demo's target
    "plain_cnn": "mishield.models.plaincnn:plain_cnn",  # the default evaluation model
    "plain_cnn16": "bench.omniglot_sizing:plain_cnn16",  # the same at half the width
    "test_efficientnet": "timm:test_efficientnet",  # candidates for a second evaluator of another family
    "test_convnext": "timm:test_convnext",
    # torchvision ResNets with a 3x3 stride-1 stem and no max-pool (the CIFAR layout), at widths
    # w, 2w, 4w, 8w: `resnet18_cifar` is the issue's ResNet-18; the others are narrower/shallower.
    "resnet18_cifar": "bench.omniglot_sizing:resnet18_cifar",
    "resnet_w16": "bench.omniglot_sizing:resnet_w16",
    "resnet_w16s2": "bench.omniglot_sizing:resnet_w16s2",
    "resnet_w24s2": "bench.omniglot_sizing:resnet_w24s2",
}


def cifar_resnet(num_classes: int, width: int, layers: tuple[int, ...], stem_stride: int = 1) -> nn.Module:
    """torchvision's ResNet (BasicBlock) with a 3x3 stem of stride `stem_stride`, no max-pool, widths w..8w."""
    from torchvision.models import resnet

    model = resnet.ResNet(resnet.BasicBlock, list(layers), num_classes=num_classes)
    # Rebuilt at width w: torchvision fixes 64..512, but _make_layer reads `inplanes` as it goes.
    model.inplanes = width
    model.conv1 = nn.Conv2d(3, width, 3, stem_stride, 1, bias=False)
    model.bn1 = nn.BatchNorm2d(width)
    model.maxpool = nn.Identity()
    for i, stride in enumerate((1, 2, 2, 2)):
        setattr(model, f"layer{i + 1}", model._make_layer(resnet.BasicBlock, width * 2**i, layers[i], stride=stride))
    model.fc = nn.Linear(8 * width, num_classes)
    for m in model.modules():  # torchvision's init, for the rebuilt layers
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


def plain_cnn16(num_classes: int = 10) -> nn.Module:
    from mishield.models.plaincnn import plain_cnn

    return plain_cnn(num_classes, width=16)


def resnet18_cifar(num_classes: int = 10) -> nn.Module:
    return cifar_resnet(num_classes, 64, (2, 2, 2, 2))


def resnet_w16(num_classes: int = 10) -> nn.Module:
    return cifar_resnet(num_classes, 16, (1, 1, 1, 1))


def resnet_w16s2(num_classes: int = 10) -> nn.Module:
    return cifar_resnet(num_classes, 16, (1, 1, 1, 1), stem_stride=2)


def resnet_w24s2(num_classes: int = 10) -> nn.Module:
    return cifar_resnet(num_classes, 24, (1, 1, 1, 1), stem_stride=2)


# ---------------------------------------------------------------------------------------------
# Augmentations (a training transform replaced for one run)


def _noflip(pre):
    from torchvision import transforms as T

    return T.Compose([t for t in train_transform(pre).transforms if not isinstance(t, T.RandomHorizontalFlip)])


# photo: mishield's default; glyph: mishield.data.glyph_train_transform (affine jitter, no mirror, no colour)
AUGMENTATIONS = {"photo": train_transform, "noflip": _noflip, "glyph": glyph_train_transform, "none": eval_transform}


@contextlib.contextmanager
def augmentation(name: str):
    """mishield's training loop builds its transform with `train_transform`; swap it for this block."""
    from mishield.training import loop

    saved = loop.train_transform
    loop.train_transform = AUGMENTATIONS[name]
    try:
        yield
    finally:
        loop.train_transform = saved


# ---------------------------------------------------------------------------------------------
# Recording


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def record(out: Path, kind: str, settings: dict, figures: dict, seconds: float, load_before: float) -> dict:
    # CPU seconds of this process beside the wall time: on a shared machine the wall time swings
    # with the other jobs, the CPU time (with one thread) is close to what an idle core would take.
    row = {"kind": kind, "settings": settings, "figures": figures, "seconds": round(seconds, 1),
           "cpu_seconds": round(time.process_time(), 1), "threads": torch.get_num_threads(), "load_before": load_before, "load_after": _load(),
           "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    with (out / "results.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row, indent=1))
    return row


def _epochs_callback(curve: list):
    def on_epoch(rec: dict) -> None:
        curve.append({"epoch": rec["epoch"], "val_acc": rec.get("val_acc"), "train_acc": rec.get("train_acc"),
                      "seconds": round(rec.get("seconds", 0.0), 2)})
        print(f"  epoch {rec['epoch']}: val {rec.get('val_acc')}, {rec.get('seconds', 0):.1f} s", flush=True)
    return on_epoch


# ---------------------------------------------------------------------------------------------
# Stages


def cmd_data(args) -> None:
    data = args.out / "data"
    t0, load = time.perf_counter(), _load()
    private = materialize_omniglot(data / "private", "private", characters_per_alphabet=args.chars, overwrite=True)
    public = materialize_omniglot(data / "public", "public", train_drawers=range(1, 21), val_drawers=(), overwrite=True)
    seconds = time.perf_counter() - t0
    p, q = load_image_folders(private), load_image_folders(public)
    record(args.out, "data", {"chars": args.chars}, {"private_classes": p.num_classes, "private_train": len(p.train),
           "private_val": len(p.val), "public_classes": q.num_classes, "public_images": len(q.train)}, seconds, load)


def _private(args) -> Path:
    return args.out / "data" / "private"


def cmd_target(args) -> None:
    from mishield.training import fit

    splits = load_image_folders(_private(args))
    name = args.name or f"{args.arch}-{args.aug}-e{args.epochs}-lr{args.lr:g}-b{args.batch_size}"
    torch.manual_seed(args.seed)
    loaded = mishield.load_model(ARCHS[args.arch], num_classes=splits.num_classes, input_size=RESOLUTION)
    curve: list = []
    t0, load = time.perf_counter(), _load()
    with augmentation(args.aug):
        fit(loaded.model, splits, loaded.preprocessing, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
            device="cpu", seed=args.seed, workers=0, on_epoch=_epochs_callback(curve))
    seconds = time.perf_counter() - t0
    path = args.out / "models" / f"{name}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    mishield.save_model(path, loaded.model.eval(), arch=ARCHS[args.arch], num_classes=splits.num_classes, surgery=None,
                        preprocessing=loaded.preprocessing, extra={"classes": splits.classes}, overwrite=True)
    params = sum(p.numel() for p in loaded.model.parameters())
    record(args.out, "target", {"arch": args.arch, "aug": args.aug, "epochs": args.epochs, "lr": args.lr,
                                "batch_size": args.batch_size, "seed": args.seed, "name": name, "params": params},
           {"val_acc": curve[-1]["val_acc"], "curve": curve, "model": str(path)}, seconds, load)


def cmd_eval(args) -> None:
    from mishield.training.evaluator import train_eval_model

    name = args.name or f"eval-{args.arch}-{args.aug}-e{args.epochs}-lr{args.lr:g}-b{args.batch_size}"
    path = args.out / "models" / f"{name}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    curve: list = []
    t0, load = time.perf_counter(), _load()
    with augmentation(args.aug):
        summary = train_eval_model(_private(args), path, arch=ARCHS[args.arch], input_size=RESOLUTION, epochs=args.epochs,
                                   lr=args.lr, batch_size=args.batch_size, device="cpu", seed=args.seed + 1,
                                   overwrite=True, workers=0, on_epoch=_epochs_callback(curve))
    record(args.out, "eval", {"arch": args.arch, "aug": args.aug, "epochs": args.epochs, "lr": args.lr,
                              "batch_size": args.batch_size, "name": name},
           {"val_acc": summary["natural_acc"], "curve": curve, "model": str(path)}, time.perf_counter() - t0, load)


def prior_nn_ratio(prior_path: Path, eval_path: Path, data: Path) -> dict:
    """The audit's prior-quality figure for one prior and one evaluator (as `mishield.audit` computes it)."""
    from mishield.attack.priors import load_prior
    from mishield.audit.evaluator import Evaluator
    from mishield.audit.trust import prior_quality
    from mishield.runtime import Runtime

    runtime = Runtime(torch.device("cpu"))
    ev = mishield.load_model(eval_path, trust_checkpoint=True)  # the bench's own factories
    evaluator = Evaluator(ev.model, ev.preprocessing, runtime, batch_size=256)
    return prior_quality(load_prior(str(prior_path)), evaluator, load_image_folders(data))


def cmd_prior(args) -> None:
    from mishield.training.prior import (
        PriorTrainingConfig,
        samples_path,
        train_prior,
    )

    config = PriorTrainingConfig(resolution=RESOLUTION, latent_dim=args.latent, width=args.width, epochs=args.epochs,
                                 batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    name = f"prior-e{args.epochs}-w{args.width}-z{args.latent}-b{args.batch_size}-lr{args.lr:g}"
    path = args.out / "priors" / f"{name}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    curve: list = []
    t0, load = time.perf_counter(), _load()
    train_prior(args.out / "data" / "public", path, config, device="cpu", overwrite=True,
                on_epoch=lambda r: curve.append({"epoch": r["epoch"], "loss_d": round(r["loss_d"], 3),
                                                  "loss_g": round(r["loss_g"], 3), "seconds": round(r["seconds"], 1)}))
    seconds = time.perf_counter() - t0
    quality = {}
    for ev in args.eval_model or []:
        quality[Path(ev).stem] = prior_nn_ratio(path, Path(ev), _private(args))
    record(args.out, "prior", {"epochs": args.epochs, "width": args.width, "latent": args.latent,
                               "batch_size": args.batch_size, "lr": args.lr, "name": name},
           {"quality": quality, "samples": str(samples_path(path)), "curve": curve, "prior": str(path)}, seconds, load)


def cmd_quality(args) -> None:
    """nn_ratio of existing priors under each given evaluator."""
    for prior in args.prior:
        t0, load = time.perf_counter(), _load()
        quality = {Path(ev).stem: prior_nn_ratio(Path(prior), Path(ev), _private(args)) for ev in args.eval_model}
        record(args.out, "quality", {"prior": Path(prior).stem}, {"quality": quality}, time.perf_counter() - t0, load)


def cmd_harden(args) -> None:
    target = args.out / "models" / f"{args.target}.pt"
    splits = load_image_folders(_private(args))
    name = args.name or f"rolss-{args.schedule}-{args.target}-e{args.epochs}"
    path = args.out / "models" / f"{name}.pt"
    common = {"data": _private(args), "batch_size": args.batch_size, "device": "cpu", "workers": 0, "seed": args.seed,
              "overwrite": True, "out": path, "method": "rolss", "schedule": args.schedule}
    curve: list = []
    t0, load = time.perf_counter(), _load()
    with augmentation(args.aug):
        if args.schedule == "tts":  # from scratch, the original's architecture: M epochs with skips, the rest without
            arch = mishield.load_model(target, trust_checkpoint=True).arch
            result = mishield.harden(arch, epochs=args.epochs - args.stage1, stage1_epochs=args.stage1, lr=args.lr,
                                     load_options={"num_classes": splits.num_classes, "input_size": RESOLUTION},
                                     on_epoch=_epochs_callback(curve), **common)
        else:
            result = mishield.harden(target, epochs=args.epochs, lr=args.lr, on_epoch=_epochs_callback(curve), **common)
    record(args.out, "harden", {"target": args.target, "schedule": args.schedule, "epochs": args.epochs,
                                "stage1": args.stage1, "lr": args.lr, "aug": args.aug, "name": name},
           {"metrics": result.metrics, "curve": curve, "model": str(path)}, time.perf_counter() - t0, load)


def spread_classes(n: int, total: int) -> list[int]:
    """n class ids spread evenly over 0..total-1, so every alphabet is represented."""
    return sorted({round(i * (total - 1) / max(1, n - 1)) for i in range(n)}) if n < total else list(range(total))


def _per_class_sd(per_class: list[dict], key: str = "attack_acc1") -> float:
    values = [c[key] for c in per_class if c.get(key) is not None]
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1))


def summarize_audit(report: dict, total_classes: int) -> list[dict]:
    """Per model: the figures that size the demo (see the module docstring)."""
    rows = []
    base = report["models"][0]["per_class"]
    for m in report["models"]:
        met, pc = m["metrics"], m["per_class"]
        sd = _per_class_sd(pc)
        ci = met["attack_acc1_interval"]
        sel = met.get("selection_only_acc1_interval") or {}
        row = {"model": m["name"], "natural_acc": met.get("natural_acc"), "attack_acc1": met["attack_acc1"],
               "ci": [ci["low"], ci["high"]], "half_width": (ci["high"] - ci["low"]) / 2,
               "selection_only": met.get("selection_only_acc1"), "selection_only_ci": [sel.get("low"), sel.get("high")],
               "reached": sum(bool(c["reached"]) for c in pc), "classes": len(pc), "sd_per_class": sd,
               "predicted_half_width_all": 1.96 * sd / math.sqrt(total_classes),
               "target_confidence": met.get("target_confidence"), "verdict": m.get("verdict", {}).get("status"),
               "knn_dist": met.get("knn_dist"), "evaluator_acc": met.get("evaluator_acc")}
        paired = met.get("paired_diff_acc1_interval")
        if paired:
            diffs = [{"d": c["attack_acc1"] - b["attack_acc1"]} for c, b in zip(pc, base)]
            sd_d = _per_class_sd(diffs, "d")
            row |= {"paired_diff": met.get("paired_diff_acc1"), "paired_ci": [paired["low"], paired["high"]],
                    "paired_half_width": (paired["high"] - paired["low"]) / 2, "sd_paired": sd_d,
                    "predicted_paired_half_width_all": 1.96 * sd_d / math.sqrt(total_classes)}
        rows.append(row)
    return rows


def cmd_audit(args) -> None:
    models = [args.out / "models" / f"{m}.pt" for m in args.models.split(",")]
    total = load_image_folders(_private(args), verify=False).num_classes
    classes = spread_classes(args.classes, total)
    attack = {k: v for k, v in (("samples", args.samples), ("candidates", args.candidates), ("iterations", args.iterations),
                                ("keep", args.keep), ("final_augmentations", args.final_augmentations),
                                ("batch_size", args.attack_batch), ("final_flip", args.final_flip),
                                ("final_scale", args.final_scale and tuple(args.final_scale))) if v is not None}
    tag = args.tag or f"{args.preset}-c{args.classes}-" + "-".join(f"{k}{v}" for k, v in attack.items()).replace(" ", "")
    dest = args.out / "audits" / tag
    t0, load = time.perf_counter(), _load()
    mishield.audit(models, data=_private(args), prior=args.prior, eval_model=args.eval_model, out=dest, classes=classes,
                   preset=args.preset, attack={**attack, "seed": args.seed}, device="cpu", overwrite=True,
                   allow_weak_budget=True, trust_checkpoint=True)
    seconds = time.perf_counter() - t0
    report = json.loads((dest / "report.json").read_text())
    quality = (report.get("prior") or {}).get("quality") or {}
    record(args.out, "audit", {"models": args.models, "classes": len(classes), "preset": args.preset, "attack": attack,
                               "prior": str(args.prior), "eval_model": str(args.eval_model), "tag": tag},
           {"rows": summarize_audit(report, total), "nn_ratio": quality.get("nn_ratio"),
            "budget": report["models"][0].get("budget"), "report": str(dest / "report.json"),
            "warnings": report.get("warnings")}, seconds, load)


# ---------------------------------------------------------------------------------------------
# Tables


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def cmd_table(args) -> None:
    rows = [json.loads(line) for line in (args.out / "results.jsonl").read_text().splitlines() if line.strip()]
    print("| kind | run | val acc % (by epoch) | s/epoch | wall s | threads | load |\n|---|---|---|---|---|---|---|")
    for r in rows:
        if r["kind"] in ("target", "eval", "harden"):
            curve = r["figures"].get("curve") or []
            accs = ", ".join(f"{c['epoch']}:{_pct(c['val_acc'])}" for c in curve if c.get("val_acc") is not None)
            per = sum(c["seconds"] for c in curve) / max(1, len(curve))
            print(f"| {r['kind']} | {r['settings']['name']} | {accs} | {per:.1f} | {r['seconds']} | {r['threads']} | "
                  f"{r['load_before']}-{r['load_after']} |")
    print("\n| prior | nn_ratio by evaluator | s/epoch | wall s | load |\n|---|---|---|---|---|")
    for r in rows:
        if r["kind"] in ("prior", "quality"):
            q = ", ".join(f"{k}: {v['nn_ratio']:.2f}" for k, v in r["figures"]["quality"].items())
            curve = r["figures"].get("curve") or []
            per = f"{sum(c['seconds'] for c in curve) / len(curve):.1f}" if curve else ""
            name = r["settings"].get("name") or r["settings"]["prior"].removesuffix(".safetensors")
            print(f"| {name} | {q} | {per} | {r['seconds']} | {r['load_before']}-{r['load_after']} |")
    print("\n| audit | model | acc@1 % [95 % CI] | half-width | sel-only % | reached | sd/class | pred. hw (all) | "
          "paired [CI] | paired sd | pred. paired hw (all) | nn_ratio | wall s | load |\n" + "|---" * 14 + "|")
    for r in rows:
        if r["kind"] != "audit":
            continue
        for m in r["figures"]["rows"]:
            paired = (f"{_pct(m['paired_diff'])} [{_pct(m['paired_ci'][0])}, {_pct(m['paired_ci'][1])}]"
                      if m.get("paired_diff") is not None else "")
            print(f"| {r['settings']['tag']} | {m['model']} | {_pct(m['attack_acc1'])} [{_pct(m['ci'][0])}, {_pct(m['ci'][1])}] | "
                  f"{_pct(m['half_width'])} | {_pct(m['selection_only'])} | {m['reached']}/{m['classes']} | "
                  f"{m['sd_per_class']:.2f} | {_pct(m['predicted_half_width_all'])} | {paired} | "
                  f"{m.get('sd_paired', float('nan')):.2f} | {_pct(m.get('predicted_paired_half_width_all'))} | "
                  f"{r['figures']['nn_ratio'] and round(r['figures']['nn_ratio'], 2)} | {r['seconds']} | "
                  f"{r['load_before']}-{r['load_after']} |")


# ---------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: a good neighbour on a shared machine)")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data")
    d.add_argument("--chars", type=int, default=None, help="characters per private alphabet (default: all)")
    for name, arch, epochs, lr in (("target", "test_resnet", 20, 3e-3), ("eval", "plain_cnn", 10, 3e-3)):
        t = sub.add_parser(name)
        t.add_argument("--arch", choices=sorted(ARCHS), default=arch)
        t.add_argument("--epochs", type=int, default=epochs)
        t.add_argument("--lr", type=float, default=lr)
        t.add_argument("--batch-size", type=int, default=32)
        t.add_argument("--aug", choices=sorted(AUGMENTATIONS), default="photo")
        t.add_argument("--seed", type=int, default=0)
        t.add_argument("--name", default=None)
    pr = sub.add_parser("prior")
    pr.add_argument("--epochs", type=int, default=10)
    pr.add_argument("--width", type=int, default=32)
    pr.add_argument("--latent", type=int, default=64)
    pr.add_argument("--batch-size", type=int, default=64)
    pr.add_argument("--lr", type=float, default=3e-4)
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--eval-model", action="append", help="evaluation model file(s) for nn_ratio")
    h = sub.add_parser("harden")
    h.add_argument("--target", required=True, help="a model name under OUT/models (without .pt)")
    h.add_argument("--schedule", choices=("tts", "finetune"), default="finetune")
    h.add_argument("--epochs", type=int, default=3, help="finetune: epochs; tts: the total, stage 1 included")
    h.add_argument("--stage1", type=int, default=0)
    h.add_argument("--lr", type=float, default=None)
    h.add_argument("--batch-size", type=int, default=32)
    h.add_argument("--aug", choices=sorted(AUGMENTATIONS), default="photo")
    h.add_argument("--seed", type=int, default=0)
    h.add_argument("--name", default=None)
    a = sub.add_parser("audit")
    a.add_argument("--models", required=True, help="comma-separated model names under OUT/models, the baseline first")
    a.add_argument("--prior", type=Path, required=True)
    a.add_argument("--eval-model", type=Path, required=True)
    a.add_argument("--classes", type=int, default=30)
    a.add_argument("--preset", default="ci")
    for knob in ("samples", "candidates", "iterations", "keep", "final-augmentations"):
        a.add_argument(f"--{knob}", type=int, default=None)
    a.add_argument("--attack-batch", type=int, default=None)
    # PPA's final selection scores random crops (scale 0.5-0.9) and mirror images (p 0.5): made
    # for faces; a character's mirror can be another character (AttackConfig.final_flip/final_scale).
    a.add_argument("--final-flip", type=float, default=None)
    a.add_argument("--final-scale", type=float, nargs=2, default=None)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--tag", default=None)
    q = sub.add_parser("quality")
    q.add_argument("--prior", action="append", required=True)
    q.add_argument("--eval-model", action="append", required=True)
    sub.add_parser("table")
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    {"data": cmd_data, "target": cmd_target, "eval": cmd_eval, "prior": cmd_prior, "harden": cmd_harden,
     "quality": cmd_quality, "audit": cmd_audit, "table": cmd_table}[args.cmd](args)


if __name__ == "__main__":
    main()
