"""Sizing the Omniglot demo and study (issue 23): what each stage costs and what it measures, on a CPU.

Every stage goes through the public API as mishield/demo.py chains it, at 32 px on the embedded
Omniglot (`mishield.data.materialize_omniglot`): the 129 private characters of Japanese
(katakana), Korean and Sanskrit, drawers 1-15 train, 16-20 validation; the 113 public characters
of the other five alphabets, all 20 drawers, for the prior and the surrogates.

* `data`: the two ImageFolders (`--chars N` keeps N characters per private alphabet);
* `target`: a target trained with `mishield.training.fit` under an augmentation (`photo`, the
  default everywhere, or `glyph`): validation accuracy after every epoch;
* `eval`: an evaluation model trained with `train_eval_model`;
* `prior`: a DCGAN prior trained with `train_prior` on the public alphabets, and the audit's
  prior-quality figure `nn_ratio` (`mishield.audit.trust.prior_quality`) in each given
  evaluator's features;
* `harden`: a hardened copy (`mishield.harden`: tts from scratch, or finetune of a target);
* `surrogate`: a LOMMA surrogate of a model (`mishield.train_surrogate`) on the public alphabets;
* `audit`: `mishield.audit` of models on N classes spread over the private classes: attack
  accuracy @1 with its class-bootstrap interval and half-width, the per-class sd and the
  half-width it predicts for all 129 classes (1.96 sd / sqrt(129)), the paired difference to the
  first model with the same, how many classes were reached, the selection-only baseline;
* `curve`: the calibration curve on this data: one optimisation to the largest step count,
  judged at every smaller count (as bench/audit_calibration.py does: Adam's update does not
  depend on the total budget), step 0 being the selection-only baseline;
* `table`: markdown tables of everything recorded so far.

Every run appends one JSON line to OUT/results.jsonl with its settings, figures, wall and CPU
seconds of the stage, torch threads and the load average before and after: the machine is shared,
so the wall time swings with the other jobs; the CPU time with one torch thread is what an idle
core would take (an upper bound for an idle 2-core machine).

    python bench/omniglot_sizing.py data
    python bench/omniglot_sizing.py target --arch test_resnet --epochs 20 --aug glyph
    python bench/omniglot_sizing.py eval --arch plain_cnn --epochs 10 --aug glyph
    python bench/omniglot_sizing.py prior --epochs 10 --eval-model OUT/models/eval-plain_cnn-glyph-e10.pt
    python bench/omniglot_sizing.py harden --target test_resnet-glyph-e20 --schedule finetune --epochs 3
    python bench/omniglot_sizing.py audit --models A,B --classes 129 --preset ci --prior P --eval-model E1 --eval-model E2
    python bench/omniglot_sizing.py curve --target A --classes 40 --steps 0,10,20,40,70,100 --prior P --eval-model E1
    python bench/omniglot_sizing.py table
"""

from __future__ import annotations

import argparse
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
from mishield.data import load_image_folders, materialize_omniglot

DEFAULT_OUT = ROOT / "out" / "omniglot-sizing"
RESOLUTION = 32
ARCHS = {
    "test_resnet": "timm:test_resnet",  # the Fashion-MNIST demo's target
    "resnet10t": "timm:resnet10t",
    "plain_cnn": "mishield.models.plaincnn:plain_cnn",  # the default evaluation model (no skips)
    "test_efficientnet": "timm:test_efficientnet",  # candidates for a second evaluator of another family
    "test_convnext": "timm:test_convnext",
    "test_vit": "timm:test_vit",
    "resnet18": "torchvision:resnet18",  # the default surrogate
    # torchvision ResNets with a 3x3 stride-1 stem and no max-pool (the CIFAR layout), at widths
    # w, 2w, 4w, 8w: `resnet18_cifar` is the issue's ResNet-18; the others are narrower/shallower.
    "resnet18_cifar": "bench.omniglot_sizing:resnet18_cifar",
    "resnet_w16": "bench.omniglot_sizing:resnet_w16",
}


def cifar_resnet(num_classes: int, width: int, layers: tuple[int, ...], stem_stride: int = 1) -> nn.Module:
    """torchvision's ResNet (BasicBlock) with a 3x3 stem of stride `stem_stride`, no max-pool, widths w..8w."""
    from torchvision.models import resnet

    model = resnet.ResNet(resnet.BasicBlock, list(layers), num_classes=num_classes)
    model.inplanes = width  # rebuilt at width w: _make_layer reads `inplanes` as it goes
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


def resnet18_cifar(num_classes: int = 10) -> nn.Module:
    return cifar_resnet(num_classes, 64, (2, 2, 2, 2))


def resnet_w16(num_classes: int = 10) -> nn.Module:
    return cifar_resnet(num_classes, 16, (1, 1, 1, 1))


# ---------------------------------------------------------------------------------------------
# Recording


def _load() -> float:
    return round(os.getloadavg()[0], 2)


class Stage:
    """Wall and CPU seconds of one stage, and the load average around it."""

    def __enter__(self):
        self.load, self.t0, self.c0 = _load(), time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.seconds, self.cpu = time.perf_counter() - self.t0, time.process_time() - self.c0
        return False


def record(out: Path, kind: str, settings: dict, figures: dict, stage: Stage) -> dict:
    row = {"kind": kind, "settings": settings, "figures": figures, "seconds": round(stage.seconds, 1),
           "cpu_seconds": round(stage.cpu, 1), "threads": torch.get_num_threads(), "load_before": stage.load,
           "load_after": _load(), "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    with (out / "results.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row, indent=1))
    return row


def _epochs_callback(curve: list):
    def on_epoch(rec: dict) -> None:
        curve.append({"epoch": rec["epoch"], "val_acc": rec.get("val_acc"), "seconds": round(rec.get("seconds", 0.0), 2)})
        print(f"  epoch {rec['epoch']}: val {rec.get('val_acc')}, {rec.get('seconds', 0):.1f} s", flush=True)
    return on_epoch


def _private(args) -> Path:
    return args.out / "data" / "private"


def _model(args, name: str) -> Path:
    return args.out / "models" / f"{name}.pt"


# ---------------------------------------------------------------------------------------------
# Stages


def cmd_data(args) -> None:
    data = args.out / "data"
    with Stage() as st:
        materialize_omniglot(data / "private", "private", characters_per_alphabet=args.chars, overwrite=True)
        materialize_omniglot(data / "public", "public", train_drawers=range(1, 21), val_drawers=(), overwrite=True)
    p, q = load_image_folders(data / "private"), load_image_folders(data / "public")
    record(args.out, "data", {"chars": args.chars}, {"private_classes": p.num_classes, "private_train": len(p.train),
           "private_val": len(p.val), "public_classes": q.num_classes, "public_images": len(q.train)}, st)


def cmd_target(args) -> None:
    from mishield.training import RunOptions, TrainingRecipe, fit

    splits = load_image_folders(_private(args))
    name = args.name or f"{args.arch}-{args.aug}-e{args.epochs}-lr{args.lr:g}-b{args.batch_size}-s{args.seed}"
    torch.manual_seed(args.seed)
    loaded = mishield.load_model(ARCHS[args.arch], num_classes=splits.num_classes, input_size=RESOLUTION)
    recipe = TrainingRecipe(schedule="finetune", epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                            augmentation=args.aug)
    curve: list = []
    with Stage() as st:
        fit(loaded.model, splits, loaded.preprocessing, recipe, options=RunOptions(device="cpu", workers=0),
            on_epoch=_epochs_callback(curve))
    path = _model(args, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    mishield.save_model(path, loaded.model.eval(), arch=ARCHS[args.arch], num_classes=splits.num_classes, surgery=None,
                        preprocessing=loaded.preprocessing, extra={"classes": splits.classes}, overwrite=True)
    params = sum(p.numel() for p in loaded.model.parameters())
    record(args.out, "target", {"arch": args.arch, "aug": args.aug, "epochs": args.epochs, "lr": args.lr,
                                "batch_size": args.batch_size, "seed": args.seed, "name": name, "params": params},
           {"val_acc": curve[-1]["val_acc"], "curve": curve, "model": str(path)}, st)


def cmd_eval(args) -> None:
    from mishield.training.evaluator import EvalModelConfig, train_eval_model

    name = args.name or f"eval-{args.arch}-{args.aug}-e{args.epochs}-lr{args.lr:g}-b{args.batch_size}-n{args.noise:g}-s{args.seed}"
    path = _model(args, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = EvalModelConfig(arch=ARCHS[args.arch], input_size=RESOLUTION, epochs=args.epochs, lr=args.lr,
                             batch_size=args.batch_size, device="cpu", seed=args.seed + 1, overwrite=True, workers=0,
                             augmentation=args.aug, noise=args.noise)
    curve: list = []
    with Stage() as st:
        summary = train_eval_model(_private(args), path, config=config, on_epoch=_epochs_callback(curve))
    record(args.out, "eval", {"arch": args.arch, "aug": args.aug, "epochs": args.epochs, "lr": args.lr,
                              "batch_size": args.batch_size, "noise": args.noise, "seed": args.seed, "name": name},
           {"val_acc": summary["natural_acc"], "curve": curve, "model": str(path)}, st)


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
    from mishield.training.prior import PriorTrainingConfig, samples_path, train_prior

    config = PriorTrainingConfig(resolution=RESOLUTION, latent_dim=args.latent, width=args.width, epochs=args.epochs,
                                 batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    name = f"prior-e{args.epochs}-w{args.width}-z{args.latent}-b{args.batch_size}-lr{args.lr:g}"
    path = args.out / "priors" / f"{name}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    curve: list = []
    with Stage() as st:
        train_prior(args.out / "data" / "public", path, config, device="cpu", overwrite=True,
                    on_epoch=lambda r: curve.append({"epoch": r["epoch"], "loss_d": round(r["loss_d"], 3),
                                                      "loss_g": round(r["loss_g"], 3), "seconds": round(r["seconds"], 1)}))
    quality = {Path(ev).stem: prior_nn_ratio(path, Path(ev), _private(args)) for ev in args.eval_model or []}
    record(args.out, "prior", {"epochs": args.epochs, "width": args.width, "latent": args.latent,
                               "batch_size": args.batch_size, "lr": args.lr, "name": name},
           {"quality": quality, "samples": str(samples_path(path)), "curve": curve, "prior": str(path)}, st)


def cmd_quality(args) -> None:
    """nn_ratio of existing priors under each given evaluator."""
    for prior in args.prior:
        with Stage() as st:
            quality = {Path(ev).stem: prior_nn_ratio(Path(prior), Path(ev), _private(args)) for ev in args.eval_model}
        record(args.out, "quality", {"prior": Path(prior).stem}, {"quality": quality}, st)


def cmd_harden(args) -> None:
    from mishield.hardening import HardenConfig

    target = _model(args, args.target)
    splits = load_image_folders(_private(args))
    name = args.name or f"{args.method}-{args.schedule}-{args.target}-e{args.epochs}"
    path = _model(args, name)
    config = HardenConfig(method=args.method, schedule=args.schedule, batch_size=args.batch_size, device="cpu", workers=0,
                          seed=args.seed, overwrite=True, lr=args.lr, augmentation=args.aug, bido=args.bido,
                          neg_ls=args.neg_ls, erase=args.erase, freeze_stages=args.freeze_stages,
                          epochs=args.epochs - args.stage1 if args.schedule == "tts" else args.epochs,
                          stage1_epochs=args.stage1 if args.schedule == "tts" else None)
    curve: list = []
    with Stage() as st:
        if args.schedule == "tts":  # from scratch, the original's architecture: M epochs with skips, the rest without
            arch = mishield.load_model(target, trust_checkpoint=True).arch
            result = mishield.harden(arch, config=config, data=_private(args), out=path, on_epoch=_epochs_callback(curve),
                                     load_options={"num_classes": splits.num_classes, "input_size": RESOLUTION})
        else:
            result = mishield.harden(target, config=config, data=_private(args), out=path, on_epoch=_epochs_callback(curve))
    record(args.out, "harden", {"target": args.target, "method": args.method, "schedule": args.schedule, "epochs": args.epochs,
                                "stage1": args.stage1, "lr": args.lr, "aug": args.aug, "name": name},
           {"metrics": result.metrics, "curve": curve, "model": str(path)}, st)


def cmd_surrogate(args) -> None:
    from mishield.training.distillation import SurrogateConfig, train_surrogate

    path = args.out / "surrogates" / f"{args.model}-{args.arch}-e{args.epochs}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    config = SurrogateConfig(arch=ARCHS[args.arch], epochs=args.epochs, device="cpu", overwrite=True, workers=0,
                             trust_checkpoint=True)
    with Stage() as st:
        result = train_surrogate(_model(args, args.model), args.out / "data" / "public", path, config=config)
    record(args.out, "surrogate", {"model": args.model, "arch": args.arch, "epochs": args.epochs},
           {"agreement": result.agreement, "surrogate": str(path)}, st)


def spread_classes(n: int, total: int) -> list[int]:
    """n class ids spread evenly over 0..total-1, so every alphabet is represented."""
    return sorted({round(i * (total - 1) / max(1, n - 1)) for i in range(n)}) if n < total else list(range(total))


def _sd(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1))


def summarize_audit(report: dict, total_classes: int) -> list[dict]:
    """Per model: the figures that size the demo (see the module docstring)."""
    rows = []
    base = report["models"][0]["per_class"]
    for m in report["models"]:
        met, pc = m["metrics"], m["per_class"]
        ci, sel = met["attack_acc1_interval"], met.get("selection_only_acc1_interval") or {}
        sd = _sd([c["attack_acc1"] for c in pc])
        row = {"model": m["name"], "natural_acc": met.get("natural_acc"), "attack_acc1": met["attack_acc1"],
               "ci": [ci["low"], ci["high"]], "half_width": (ci["high"] - ci["low"]) / 2, "attack": m.get("attack"),
               "selection_only": met.get("selection_only_acc1"), "selection_only_ci": [sel.get("low"), sel.get("high")],
               "reached": sum(bool(c["reached"]) for c in pc), "classes": len(pc), "sd_per_class": sd,
               "predicted_half_width_all": 1.96 * sd / math.sqrt(total_classes),
               "target_confidence": met.get("target_confidence"), "verdict": (m.get("verdict") or {}).get("status"),
               "knn_dist": met.get("knn_dist"), "evaluators": {e.get("name", str(i)): e.get("attack_acc1")
                                                              for i, e in enumerate(met.get("evaluators") or [])},
               "per_attack": {a["attack"]: a["metrics"]["attack_acc1"] for a in m.get("attacks") or []}}
        paired = met.get("paired_diff_acc1_interval")
        if paired:
            sd_d = _sd([c["attack_acc1"] - b["attack_acc1"] for c, b in zip(pc, base)])
            row |= {"paired_diff": met.get("paired_diff_acc1"), "paired_ci": [paired["low"], paired["high"]],
                    "paired_half_width": (paired["high"] - paired["low"]) / 2, "sd_paired": sd_d,
                    "predicted_paired_half_width_all": 1.96 * sd_d / math.sqrt(total_classes)}
        rows.append(row)
    return rows


def _budget(args) -> dict:
    return {k: v for k, v in (("samples", args.samples), ("candidates", args.candidates), ("iterations", args.iterations),
                              ("keep", args.keep), ("final_augmentations", args.final_augmentations),
                              ("batch_size", args.attack_batch), ("lr", args.lr), ("final_flip", args.final_flip),
                              ("final_scale", args.final_scale and tuple(args.final_scale))) if v is not None}


def cmd_audit(args) -> None:
    from mishield.audit.config import AuditConfig

    models = [_model(args, m) for m in args.models.split(",")]
    total = load_image_folders(_private(args), verify=False).num_classes
    classes = spread_classes(args.classes, total)
    budget = _budget(args)
    tag = args.tag or f"{args.preset}-c{args.classes}-{args.attacks.replace(',', '+')}-" + "-".join(f"{k}{v}" for k, v in budget.items())
    dest = args.out / "audits" / tag
    config = AuditConfig.preset(args.preset, **budget, seed=args.seed, classes=tuple(classes), attacks=args.attacks,
                                device="cpu", overwrite=True, allow_weak_budget=True, trust_checkpoint=True)
    surrogates = [Path(s) for s in args.surrogate or []]
    with Stage() as st:
        mishield.audit(models, data=_private(args), prior=args.prior, eval_model=[Path(e) for e in args.eval_model],
                       surrogates=surrogates or None, config=config, out=dest)
    report = json.loads((dest / "report.json").read_text())
    quality = (report.get("prior") or {}).get("quality") or {}
    record(args.out, "audit", {"models": args.models, "classes": len(classes), "preset": args.preset, "budget": budget,
                               "attacks": args.attacks, "prior": str(args.prior), "eval_model": args.eval_model, "tag": tag},
           {"rows": summarize_audit(report, total), "nn_ratio": quality.get("nn_ratio"),
            "budget": report["models"][0].get("budget"), "report": str(dest / "report.json"),
            "timing": [m.get("timing") for m in report["models"]], "warnings": report.get("warnings")}, st)


def cmd_curve(args) -> None:
    """Attack accuracy @1 against the number of steps, at the prior's lr, without lr cuts."""
    from mishield.attack.augment import candidate_keys
    from mishield.attack.config import make_config
    from mishield.attack.engine import InversionAttack, select_top, to_uint8
    from mishield.attack.priors import load_prior
    from mishield.audit.evaluator import Evaluator
    from mishield.audit.metrics import topk_hits
    from mishield.audit.stats import class_bootstrap
    from mishield.runtime import Runtime

    runtime = Runtime(torch.device("cpu"))
    target = mishield.load_model(_model(args, args.target), trust_checkpoint=True)
    pre = target.preprocessing
    total = target.num_classes
    classes = spread_classes(args.classes, total)
    prior = load_prior(str(args.prior), target_input_size=pre.input_size)
    evaluators = []
    for e in args.eval_model:
        ev = mishield.load_model(e, trust_checkpoint=True)
        evaluators.append((Path(e).stem, Evaluator(ev.model.eval(), ev.preprocessing, runtime, batch_size=256)))
    # No lr cuts: then a snapshot at step n is exactly an n-step attack (Adam's update does not depend on the total).
    cfg = make_config(args.preset, **{**_budget(args), "iterations": max(args.steps), "seed": args.seed,
                                      "milestones": ()}).resolve(prior)
    attack = InversionAttack(prior, target.model.eval(), pre, cfg, runtime)
    labels = torch.tensor(classes).repeat_interleave(cfg.candidates)
    keys = candidate_keys(cfg.seed, labels, torch.arange(cfg.candidates).repeat(len(classes)))
    points = []
    with Stage() as st:
        pool, _ = attack.initial_selection(classes)
        latents = pool.detach().clone().requires_grad_(True)
        optimizer = attack.step.make_optimizer(latents)
        for step in range(max(args.steps) + 1):
            if step in args.steps:
                scores = attack.final_scores(latents.detach(), labels, keys)
                flat, kept_scores = select_top(scores, len(classes), cfg.keep)
                with torch.no_grad():
                    images = to_uint8(attack.prior.generate(latents.detach()))
                point = {"steps": step, "seconds": round(time.perf_counter() - st.t0, 1),
                         "target_confidence": float(kept_scores.mean()),
                         "reached": int((kept_scores.mean(dim=1) >= 0.5).sum())}
                for name, evaluator in evaluators:
                    logits, _ = evaluator.images(images)
                    kept = topk_hits(logits[flat], labels[flat], 1).view(len(classes), cfg.keep).numpy()
                    iv = class_bootstrap(kept, seed=args.seed)
                    point[name] = {"acc1": iv.estimate, "ci": [iv.low, iv.high],
                                   "unfiltered": float(topk_hits(logits, labels, 1).float().mean())}
                points.append(point)
                print(json.dumps(point), flush=True)
            if step == max(args.steps):
                break
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr_at(step)
            optimizer.zero_grad(set_to_none=True)
            attack.step.forward(latents, labels, keys, torch.tensor(step)).backward()
            optimizer.step()
            with torch.no_grad():
                attack.prior.constrain_(latents)
    record(args.out, "curve", {"target": args.target, "classes": len(classes), "preset": args.preset,
                               "budget": {**_budget(args), "lr": cfg.lr, "milestones": list(cfg.milestones or ())},
                               "prior": str(args.prior), "eval_model": args.eval_model},
           {"points": points}, st)


# ---------------------------------------------------------------------------------------------
# Tables


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def cmd_table(args) -> None:
    rows = [json.loads(line) for line in (args.out / "results.jsonl").read_text().splitlines() if line.strip()]
    print("| kind | run | val acc % (by epoch) | cpu s | wall s | load |\n|---|---|---|---|---|---|")
    for r in rows:
        if r["kind"] in ("target", "eval", "harden"):
            curve = r["figures"].get("curve") or []
            accs = ", ".join(f"{c['epoch']}:{_pct(c['val_acc'])}" for c in curve if c.get("val_acc") is not None)
            print(f"| {r['kind']} | {r['settings']['name']} | {accs} | {r['cpu_seconds']} | {r['seconds']} | "
                  f"{r['load_before']}-{r['load_after']} |")
    print("\n| prior / surrogate | figure | cpu s | wall s | load |\n|---|---|---|---|---|")
    for r in rows:
        if r["kind"] in ("prior", "quality"):
            q = ", ".join(f"{k}: {v['nn_ratio']:.2f}" for k, v in r["figures"]["quality"].items())
            name = r["settings"].get("name") or r["settings"].get("prior")
            print(f"| {name} | nn_ratio {q} | {r['cpu_seconds']} | {r['seconds']} | {r['load_before']}-{r['load_after']} |")
        if r["kind"] == "surrogate":
            print(f"| {r['settings']} | agreement {r['figures']['agreement']:.3f} | {r['cpu_seconds']} | {r['seconds']} | "
                  f"{r['load_before']}-{r['load_after']} |")
    print("\n| audit | model | acc@1 % [95 % CI] | hw | sel-only % | reached | pred. hw (all) | paired [CI] | "
          "paired hw | pred. paired hw (all) | nn_ratio | cpu s | wall s | load |\n" + "|---" * 14 + "|")
    for r in rows:
        if r["kind"] != "audit":
            continue
        for m in r["figures"]["rows"]:
            paired = (f"{_pct(m['paired_diff'])} [{_pct(m['paired_ci'][0])}, {_pct(m['paired_ci'][1])}]"
                      if m.get("paired_diff") is not None else "")
            nn_ratio = r["figures"]["nn_ratio"]
            print(f"| {r['settings']['tag']} | {m['model']} | {_pct(m['attack_acc1'])} [{_pct(m['ci'][0])}, {_pct(m['ci'][1])}] | "
                  f"{_pct(m['half_width'])} | {_pct(m['selection_only'])} | {m['reached']}/{m['classes']} | "
                  f"{_pct(m['predicted_half_width_all'])} | {paired} | {_pct(m.get('paired_half_width'))} | "
                  f"{_pct(m.get('predicted_paired_half_width_all'))} | {nn_ratio and round(nn_ratio, 2)} | "
                  f"{r['cpu_seconds']} | {r['seconds']} | {r['load_before']}-{r['load_after']} |")
    for r in rows:
        if r["kind"] == "curve":
            print(f"\ncurve {r['settings']['target']} ({r['settings']['classes']} classes, {r['settings']['budget']}): "
                  f"cpu {r['cpu_seconds']} s")
            for p in r["figures"]["points"]:
                evs = ", ".join(f"{k} {_pct(v['acc1'])} [{_pct(v['ci'][0])}, {_pct(v['ci'][1])}]"
                                for k, v in p.items() if isinstance(v, dict))
                print(f"  I={p['steps']}: conf {p['target_confidence']:.2f}, reached {p['reached']}, {evs}, {p['seconds']} s")


# ---------------------------------------------------------------------------------------------


def _budget_options(a: argparse.ArgumentParser) -> None:
    for knob in ("samples", "candidates", "iterations", "keep", "final-augmentations"):
        a.add_argument(f"--{knob}", type=int, default=None)
    a.add_argument("--attack-batch", type=int, default=None)
    a.add_argument("--lr", type=float, default=None)
    # PPA's final selection scores random crops (scale 0.5-0.9) and mirror images (p 0.5): made
    # for faces; a character's mirror can be another character (AttackConfig.final_flip/final_scale).
    a.add_argument("--final-flip", type=float, default=None)
    a.add_argument("--final-scale", type=float, nargs=2, default=None)
    a.add_argument("--preset", default="ci")
    a.add_argument("--prior", type=Path, required=True)
    a.add_argument("--eval-model", action="append", required=True)
    a.add_argument("--classes", type=int, default=30)
    a.add_argument("--seed", type=int, default=0)


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
        t.add_argument("--aug", choices=("photo", "glyph"), default="glyph")
        t.add_argument("--seed", type=int, default=0)
        t.add_argument("--name", default=None)
        if name == "eval":  # train-eval's Gaussian pixel noise (0: none; mishield.training.evaluator.DEFAULT_EVAL_NOISE)
            t.add_argument("--noise", type=float, default=0.0)
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
    h.add_argument("--method", choices=("rolss", "ssf"), default="rolss")
    h.add_argument("--schedule", choices=("tts", "finetune"), default="finetune")
    h.add_argument("--epochs", type=int, default=3, help="finetune: epochs; tts: the total, stage 1 included")
    h.add_argument("--stage1", type=int, default=0)
    h.add_argument("--lr", type=float, default=None)
    h.add_argument("--batch-size", type=int, default=32)
    h.add_argument("--aug", choices=("photo", "glyph"), default="glyph")
    h.add_argument("--bido", action="store_true")
    h.add_argument("--neg-ls", type=float, default=None)
    h.add_argument("--erase", default=None)
    h.add_argument("--freeze-stages", type=int, default=0)
    h.add_argument("--seed", type=int, default=0)
    h.add_argument("--name", default=None)
    s = sub.add_parser("surrogate")
    s.add_argument("--model", required=True)
    s.add_argument("--arch", choices=sorted(ARCHS), default="resnet18")
    s.add_argument("--epochs", type=int, default=10)
    a = sub.add_parser("audit")
    a.add_argument("--models", required=True, help="comma-separated model names under OUT/models, the baseline first")
    a.add_argument("--attacks", default="ppa")
    a.add_argument("--surrogate", action="append")
    a.add_argument("--tag", default=None)
    _budget_options(a)
    c = sub.add_parser("curve")
    c.add_argument("--target", required=True)
    c.add_argument("--steps", type=lambda s: [int(x) for x in s.split(",")], default=[0, 10, 20, 40, 70, 100])
    _budget_options(c)
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
     "surrogate": cmd_surrogate, "quality": cmd_quality, "audit": cmd_audit, "curve": cmd_curve,
     "table": cmd_table}[args.cmd](args)


if __name__ == "__main__":
    main()
