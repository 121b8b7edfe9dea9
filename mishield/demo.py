"""`run_demo`: the whole promise on the embedded Fashion-MNIST subset, measured in one run.

What a user would do, at a size a laptop CPU finishes (docs/demo.md):

1. split Fashion-MNIST's ten classes into private (0-4, the target's) and public (5-9, the
   attacker's prior): class-disjoint, so the prior never saw a private class;
2. train a small ResNet target with full skips (timm's `test_resnet`, 32 px);
3. harden copies with `mishield.harden`: RoLSS trained with TTS (the same total epoch budget as
   the original: M epochs with skips, the rest without), SSF fine-tuned from the trained original, and in the full run BiDO + RoLSS;
4. train the evaluation model (`train_eval_model`, a skip-free CNN) and the DCGAN prior (`train_prior`);
5. audit every model in one `mishield.audit` call, the original first, so every Δ and every
   paired interval is against it (same pool, same crops);
6. export the RoLSS model to ONNX with onnxruntime parity checked (`mishield.export_onnx`);
7. return the table: natural accuracy, attack accuracy @1 (class-bootstrap interval) and @5,
   KNN distance, the paired difference to the original with its interval, and Δ.

Every stage writes its outputs atomically into `out` and records its settings in
`out/demo-state.json`; a stage whose outputs exist and whose recorded settings match is skipped,
so an interrupted demo continues where it stopped and a second run only rebuilds the table.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mishield.errors import UsageError
from mishield.progress import EpochCallback, ProgressCallback

SCHEMA_VERSION = 1
STATE_FILE = "demo-state.json"
TARGET_ARCH = "timm:test_resnet"  # a ResNet with full skips, small enough for a CPU
PRIVATE_CLASSES = (0, 1, 2, 3, 4)  # T-shirt/top, Trouser, Pullover, Dress, Coat
PUBLIC_CLASSES = (5, 6, 7, 8, 9)  # Sandal, Shirt, Sneaker, Bag, Ankle boot
RESOLUTION = 32

# Two sizes. The epoch counts and the attack were tuned on a shared 2-core CPU so that the full
# demo stays under 10 minutes and --quick under 1 minute (docs/demo.md has the measured times);
# `seconds` are those measurements per stage, used only to say roughly how long is left (scaled by
# the pace of the stages already run, so a loaded machine gets an honest estimate).
SIZES: dict[str, dict[str, Any]] = {
    "quick": {
        "train_per_class": 40, "val_per_class": 20, "public_per_class": 40,
        "target_epochs": 3, "tts_stage1": 1, "ssf_epochs": 1, "bido": False,
        "eval_epochs": 8, "prior": {"epochs": 2, "latent_dim": 32, "width": 16, "batch_size": 32, "lr": 3e-4},
        "attack": {"samples": 40, "candidates": 4, "iterations": 5, "keep": 4, "final_augmentations": 2, "batch_size": 40},
        "seconds": {"data": 1, "target": 2, "rolss_tts": 2, "ssf": 1, "eval": 2, "prior": 1, "audit": 1, "export": 3},
    },
    "full": {
        "train_per_class": 300, "val_per_class": 100, "public_per_class": 300,
        "target_epochs": 12, "tts_stage1": 4, "ssf_epochs": 4, "bido": True,
        "eval_epochs": 10, "prior": {"epochs": 20, "latent_dim": 64, "width": 32, "batch_size": 64, "lr": 3e-4},
        "attack": {"batch_size": 100},  # the default preset's budget; only the batch is sized for a CPU
        "seconds": {"data": 1, "target": 25, "rolss_tts": 25, "ssf": 10, "bido_rolss": 35, "eval": 45, "prior": 110,
                    "audit": 25, "export": 3},
    },
}
# 3e-3 rather than the recipe's 1e-3: the demo trains from scratch for a few hundred steps at most,
# and at 1e-3 test_resnet is still near chance after the quick run's 20 steps (measured: 19 %).
LR = 3e-3
BATCH_SIZE = 32
MODELS = (("original", "original.pt"), ("RoLSS+TTS", "rolss-tts.pt"), ("SSF", "ssf.pt"), ("BiDO+RoLSS", "bido-rolss.pt"))

StageLog = Callable[[str], None]


@dataclass
class DemoResult:
    """What `run_demo` measured. `to_dict()` is `mishield demo --json`'s document."""

    out: Path
    quick: bool
    rows: list[dict]  # one per audited model, the original first
    report_html: Path
    report_json: Path
    onnx: dict  # path, max_abs_diff, top1_agree / parity
    figure: Path
    stages: list[dict] = field(default_factory=list)  # name, cached, seconds
    warnings: list[str] = field(default_factory=list)  # the audit's (weak prior, unreached classes, ...)
    seconds: float = 0.0
    device: str = "cpu"

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "out": str(self.out),
            "quick": self.quick,
            "device": self.device,
            "private_classes": list(PRIVATE_CLASSES),
            "public_classes": list(PUBLIC_CLASSES),
            "rows": self.rows,
            "report_html": str(self.report_html),
            "report_json": str(self.report_json),
            "onnx": self.onnx,
            "figure": str(self.figure),
            "stages": self.stages,
            "warnings": self.warnings,
            "seconds": round(self.seconds, 2),
        }


class _Stages:
    """The cache: `out/demo-state.json` maps each finished stage to its settings, outputs and record."""

    def __init__(self, out: Path, plan: list[str], seconds: dict[str, float], log: StageLog | None):
        self.out, self.path, self.plan, self.seconds, self.log = out, out / STATE_FILE, plan, seconds, log
        self.done: dict[str, dict] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.ran: list[dict] = []

    def run(self, name: str, settings: dict, outputs: list[str], work: Callable[[], dict | None]) -> dict:
        """Run `work` unless the same settings already produced `outputs`; returns the stage's record."""
        settings = json.loads(json.dumps(settings, default=str))  # what JSON reads back compares equal
        entry = self.done.get(name)
        if entry and entry.get("settings") == settings and all((self.out / o).exists() for o in outputs):
            self.ran.append({"name": name, "cached": True, "seconds": 0.0})
            self._say(f"stage {self._index(name)} {name}: cached")
            return entry.get("record") or {}
        self._say(f"stage {self._index(name)} {name}: running, {self._left(name)}")
        self.done.pop(name, None)
        self._save()
        from mishield.training.interrupt import TrainingInterrupted

        t0 = time.perf_counter()
        try:
            record = work() or {}
        except TrainingInterrupted as err:
            # The demo has no --resume: a plain rerun keeps every finished stage and redoes this one.
            what = str(err).split(";")[0]
            raise type(err)(f"the demo was stopped in stage {self._index(name)} {name} ({what}); rerun the same "
                            "command: the finished stages are kept and this one starts again.") from None
        seconds = time.perf_counter() - t0
        self.done[name] = {"settings": settings, "outputs": outputs, "record": record, "seconds": round(seconds, 2),
                           "finished": time.time()}
        self._save()
        self.ran.append({"name": name, "cached": False, "seconds": round(seconds, 2)})
        return record

    def stamp(self, *names: str) -> dict:
        """When each named stage last finished: part of a later stage's settings, so redoing an
        input (new data, a retrained target) also redoes everything built from it."""
        return {n: self.done[n].get("finished") for n in names}

    def _index(self, name: str) -> str:
        return f"{self.plan.index(name) + 1}/{len(self.plan)}"

    def _left(self, name: str) -> str:
        """How long the rest should take: the remaining stages' idle timings, scaled by how much
        slower (or faster) than those timings the stages run so far were on this machine."""
        rest = sum(self.seconds.get(s, 0) for s in self.plan[self.plan.index(name):] if s not in self.done)
        ran = [r for r in self.ran if not r["cached"] and self.seconds.get(r["name"])]
        if not ran:
            return f"roughly {rest:.0f} s left on an idle 2-core CPU"
        pace = sum(r["seconds"] for r in ran) / sum(self.seconds[r["name"]] for r in ran)
        return f"roughly {pace * rest:.0f} s left at this machine's pace so far"

    def _say(self, line: str) -> None:
        if self.log is not None:
            self.log(line)

    def _save(self) -> None:
        from mishield.fileio import atomic_output

        with atomic_output(self.path, overwrite=True) as tmp:
            tmp.write_text(json.dumps(self.done, indent=1, default=str))


def run_demo(
    out: str | Path = "mishield-demo",
    *,
    quick: bool = False,
    device: str = "auto",
    seed: int = 0,
    progress: ProgressCallback | None = None,
    on_epoch: EpochCallback | None = None,
    log: StageLog | None = None,
) -> DemoResult:
    """Run (or continue) the demo in `out`; see the module docstring for the stages.

    `progress` and `on_epoch` go to the library's trainers and the audit; `log` receives one
    line per stage (which stage runs, roughly how long is left).
    """
    from mishield.runtime import resolve_device

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"`out` {out} is a file; the demo writes a folder.")
    out.mkdir(parents=True, exist_ok=True)
    size = SIZES["quick" if quick else "full"]
    dev = str(resolve_device(device))
    names = ["RoLSS+TTS", "SSF"] + (["BiDO+RoLSS"] if size["bido"] else [])
    plan = ["data", "target", "rolss_tts", "ssf", *(["bido_rolss"] if size["bido"] else []), "eval", "prior", "audit", "export"]
    stages = _Stages(out, plan, size["seconds"], log)
    t0 = time.perf_counter()
    ctx = {"out": out, "size": size, "device": dev, "seed": seed, "progress": progress, "on_epoch": on_epoch, "quick": quick}
    _data_stage(stages, ctx)
    _model_stages(stages, ctx)
    report = _audit_stage(stages, ctx, names)
    onnx = _export_stage(stages, ctx)
    rows = demo_table(report)
    figure = write_figure(report, out / "audit", out / "demo.png")
    return DemoResult(out=out, quick=quick, rows=rows, report_html=out / "audit" / "report.html",
                      report_json=out / "audit" / "report.json", onnx=onnx, figure=figure, stages=stages.ran,
                      warnings=list(report.get("warnings") or []), seconds=time.perf_counter() - t0, device=dev)


def _data_stage(stages: _Stages, ctx: dict) -> None:
    from mishield.data import materialize_fashion_mnist

    size, out = ctx["size"], ctx["out"]
    settings = {k: size[k] for k in ("train_per_class", "val_per_class", "public_per_class")}
    settings |= {"private": PRIVATE_CLASSES, "public": PUBLIC_CLASSES}

    def work() -> None:
        # Written into a scratch folder and renamed, so a half-written split is never mistaken for data.
        for role, classes, per_class, val in (("private", PRIVATE_CLASSES, size["train_per_class"], size["val_per_class"]),
                                              ("public", PUBLIC_CLASSES, size["public_per_class"], 1)):
            final, tmp = out / "data" / role, out / "data" / f".{role}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            materialize_fashion_mnist(tmp, classes, train_per_class=per_class, val_per_class=val)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)

    stages.run("data", settings, ["data/private", "data/public"], work)


def _model_stages(stages: _Stages, ctx: dict) -> None:
    """The original target, its hardened copies, the evaluation model and the prior."""
    import mishield
    from mishield.hardening import HardenConfig
    from mishield.training.evaluator import EvalModelConfig, train_eval_model
    from mishield.training.prior import PriorTrainingConfig, train_prior

    out, size, dev, seed = ctx["out"], ctx["size"], ctx["device"], ctx["seed"]
    private, public = out / "data" / "private", out / "data" / "public"
    run = {"device": dev, "workers": 0, "seed": seed, "overwrite": True, "batch_size": BATCH_SIZE, "lr": LR}
    report = {"progress": ctx["progress"], "on_epoch": ctx["on_epoch"]}
    spec = {"num_classes": len(PRIVATE_CLASSES), "input_size": RESOLUTION}
    tts = HardenConfig(method="rolss", schedule="tts", epochs=size["target_epochs"] - size["tts_stage1"],
                       stage1_epochs=size["tts_stage1"], **run)
    stages.run("target", {"epochs": size["target_epochs"], "seed": seed, "arch": TARGET_ARCH, "lr": LR, **stages.stamp("data")},
               ["original.pt"], lambda: _train_target(ctx))
    stages.run("rolss_tts", {"epochs": size["target_epochs"], "stage1": size["tts_stage1"], "seed": seed, "lr": LR, **stages.stamp("data")},
               ["rolss-tts.pt"], lambda: _harden_record(mishield.harden(
                   TARGET_ARCH, config=tts, data=private, out=out / "rolss-tts.pt", load_options=spec, **report)))
    # SSF fine-tunes the trained original (at a tenth of the learning rate: it is already trained).
    ssf = HardenConfig(method="ssf", schedule="finetune", epochs=size["ssf_epochs"], **{**run, "lr": LR / 10})
    stages.run("ssf", {"epochs": size["ssf_epochs"], "seed": seed, **stages.stamp("data", "target")},
               ["ssf.pt"], lambda: _harden_record(mishield.harden(
                   out / "original.pt", config=ssf, data=private, out=out / "ssf.pt", **report)))
    if size["bido"]:
        stages.run("bido_rolss", {"epochs": size["target_epochs"], "stage1": size["tts_stage1"], "seed": seed,
                                  **stages.stamp("data")},
                   ["bido-rolss.pt"], lambda: _harden_record(mishield.harden(
                       TARGET_ARCH, config=tts.replace(bido=True), data=private, out=out / "bido-rolss.pt",
                       load_options=spec, **report)))
    evaluator = EvalModelConfig(input_size=RESOLUTION, epochs=size["eval_epochs"], batch_size=BATCH_SIZE, lr=LR, device=dev,
                                seed=seed + 1, overwrite=True, workers=0)
    stages.run("eval", {"epochs": size["eval_epochs"], "seed": seed + 1, "lr": LR, **stages.stamp("data")}, ["eval.pt"],
               lambda: train_eval_model(private, out / "eval.pt", config=evaluator, **report))
    prior_config = PriorTrainingConfig(resolution=RESOLUTION, seed=seed, **size["prior"])
    stages.run("prior", {**size["prior"], "seed": seed, **stages.stamp("data")}, ["prior.safetensors"], lambda: {"out": str(train_prior(
        public, out / "prior.safetensors", prior_config, device=dev, overwrite=True, **report))})


def _train_target(ctx: dict) -> dict:
    """The model a user would have: timm's test_resnet with all its skips, trained on the private classes."""
    import torch

    import mishield
    from mishield.data import load_image_folders
    from mishield.training import RunOptions, TrainingRecipe, evaluate_accuracy, fit

    out = ctx["out"]
    torch.manual_seed(ctx["seed"])
    loaded = mishield.load_model(TARGET_ARCH, num_classes=len(PRIVATE_CLASSES), input_size=RESOLUTION)
    splits = load_image_folders(out / "data" / "private")
    recipe = TrainingRecipe(schedule="finetune", epochs=ctx["size"]["target_epochs"], batch_size=BATCH_SIZE, lr=LR, seed=ctx["seed"])
    fit(loaded.model, splits, loaded.preprocessing, recipe, options=RunOptions(device=ctx["device"], workers=0),
        progress=ctx["progress"], on_epoch=ctx["on_epoch"])
    model = loaded.model.eval().cpu()
    accuracy = evaluate_accuracy(model, splits.val, loaded.preprocessing, batch_size=BATCH_SIZE)
    mishield.save_model(out / "original.pt", model, arch=TARGET_ARCH, num_classes=len(PRIVATE_CLASSES), surgery=None,
                        preprocessing=loaded.preprocessing, extra={"classes": splits.classes}, overwrite=True)
    return {"natural_acc": accuracy}


def _harden_record(result) -> dict:
    return {"metrics": result.metrics, "seconds": round(result.seconds, 2)}


def _audit_stage(stages: _Stages, ctx: dict, names: list[str]) -> dict:
    """One audit of every model, the original first: the Δ and paired columns are against it."""
    import mishield
    from mishield.audit.config import AuditConfig

    out, size = ctx["out"], ctx["size"]
    files = [out / f for n, f in MODELS if n == "original" or n in names]
    settings = {"models": [str(f) for f in files], "attack": size["attack"], "seed": ctx["seed"],
                **stages.stamp(*stages.plan[:stages.plan.index("audit")])}

    def work() -> None:
        # --quick is a smoke run: its evaluator may stay below the trust floor, which the report then
        # states as a warning (and no gate is set); the full demo must pass it.
        config = AuditConfig.preset(**size["attack"], seed=ctx["seed"], device=ctx["device"], overwrite=True,
                                    allow_weak_evaluator=ctx["quick"])
        mishield.audit(files, data=out / "data" / "private", prior=out / "prior.safetensors", eval_model=out / "eval.pt",
                       config=config, out=out / "audit", progress=ctx["progress"])

    stages.run("audit", settings, ["audit/report.json", "audit/report.html"], work)
    return json.loads((out / "audit" / "report.json").read_text())


def _export_stage(stages: _Stages, ctx: dict) -> dict:
    import mishield

    out = ctx["out"]

    def work() -> dict:
        loaded = mishield.load_model(out / "rolss-tts.pt")
        report = mishield.export_onnx(loaded.model, out / "rolss-tts.onnx", input_size=loaded.preprocessing.input_size,
                                      overwrite=True)
        return {"path": str(report.path), "max_abs_diff": report.max_abs_diff, "parity": True,
                "atol": 1e-4}

    return stages.run("export", stages.stamp("rolss_tts"), ["rolss-tts.onnx"], work)


def _hits(per_class: list[dict]):
    """Per-class outcomes rebuilt from the report's per-class counts. The class bootstrap and the
    paired difference depend only on each class's hit count and size, so this gives exactly the
    intervals the raw 0/1 outcomes would."""
    import numpy as np

    width = max(int(c["n"]) for c in per_class)
    hits = np.full((len(per_class), width), np.nan)
    for i, c in enumerate(per_class):
        n = int(c["n"])
        k = round(c["attack_acc1"] * n)
        hits[i, :n] = [1.0] * k + [0.0] * (n - k)
    if np.isnan(hits).any():
        raise ValueError("the demo's audit kept a different number of reconstructions per class.")
    return hits


def demo_table(report: dict) -> list[dict]:
    """The paper-style rows from an audit report.json: one per model, the original first."""
    from mishield.audit.stats import class_bootstrap, paired_difference

    models = report["models"]
    base = _hits(models[0]["per_class"])
    rows = []
    for i, m in enumerate(models):
        hits, metrics, delta = _hits(m["per_class"]), m["metrics"], m.get("delta") or {}
        ci = class_bootstrap(hits, seed=report.get("seed", 0))
        paired = None if i == 0 else paired_difference(base, hits, seed=report.get("seed", 0))
        rows.append({
            "model": m["name"],
            "natural_acc": metrics.get("natural_acc"),
            "attack_acc1": ci.estimate,
            "attack_acc1_ci95": [ci.low, ci.high],
            "attack_acc5": metrics.get("attack_acc5"),
            "knn_dist": metrics.get("knn_dist"),
            "classes": ci.classes,
            "images": ci.images,
            "paired_diff": None if paired is None else paired.estimate,
            "paired_diff_ci95": None if paired is None else [paired.low, paired.high],
            "delta": delta.get("delta"),
            "verdict": (m.get("verdict") or {}).get("status"),
            "verdict_reason": (m.get("verdict") or {}).get("reason"),
        })  # fmt: skip
    return rows


def write_figure(report: dict, audit_dir: Path, dest: Path) -> Path:
    """One picture for the README: the original's and the first hardened model's reconstruction
    grids side by side (each row a class: reconstructions, gap, real private images), captioned
    with the measured numbers."""
    from PIL import Image, ImageDraw

    from mishield.fileio import atomic_output

    rows = demo_table(report)
    panels = []
    for m, row in list(zip(report["models"], rows))[:2]:
        with Image.open(audit_dir / m["grid"]) as img:
            grid = img.convert("RGB")
        scale = max(1, 256 // grid.height)
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
        lo, hi = row["attack_acc1_ci95"]
        caption = [f"{row['model']}", f"natural acc {_pct(row['natural_acc'])}",
                   f"attack acc@1 {_pct(row['attack_acc1'])} [{_pct(lo)}, {_pct(hi)}]"]
        if row["paired_diff"] is not None:
            dlo, dhi = row["paired_diff_ci95"]
            caption.append(f"vs original {100 * row['paired_diff']:+.1f} pts [{100 * dlo:+.1f}, {100 * dhi:+.1f}]")
        panel = Image.new("RGB", (max(grid.width, 300), grid.height + 16 * len(caption) + 8), "white")
        draw = ImageDraw.Draw(panel)
        for j, line in enumerate(caption):
            draw.text((4, 4 + 16 * j), line, fill="black")
        panel.paste(grid, (0, 16 * len(caption) + 8))
        panels.append(panel)
    width = sum(p.width for p in panels) + 16 * (len(panels) - 1)
    canvas = Image.new("RGB", (width, max(p.height for p in panels)), "white")
    x = 0
    for p in panels:
        canvas.paste(p, (x, 0))
        x += p.width + 16
    with atomic_output(dest, overwrite=True) as tmp:
        canvas.save(tmp, format="PNG")
    return dest


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"
