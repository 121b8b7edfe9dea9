"""`run_demo`: the whole promise on embedded data, measured in one run (docs/demo.md).

What a user would do, at a size a laptop CPU finishes, on one of two embedded datasets
(`DemoConfig.dataset`):

* `omniglot` (the default): 129 handwritten characters of three alphabets (Japanese katakana,
  Korean, Sanskrit) are the private classes, drawers 1-15 train and 16-20 validation; the other
  five alphabets (113 characters) are the attacker's public data. Many classes: the audit's
  intervals, whose unit is the class, are narrow enough to tell the models apart.
* `fashion-mnist`: classes 0-4 private, 5-9 public. Five classes: every interval spans tens of
  points, so it shows the workflow, not an effect.

The stages, each cached:

1. data: the class-disjoint split (the prior never sees a private class);
2. target: a small ResNet with full skips (timm's `test_resnet`, 32 px) trained on the private classes;
3. the hardened copies (`mishield.harden`), e.g. RoLSS on the trained target with fine-tuning;
4. two evaluation models of different architectures (`train_eval_model`: mishield's skip-free CNN
   and timm's `test_efficientnet`): the audit reads each model by the more leaky one;
5. the DCGAN prior on the public classes (`train_prior`);
6. ONE `mishield.audit` of every model, the original first, so every Δ and every paired interval
   is against it (same pool, same crops);
7. the first hardened model exported to ONNX with onnxruntime parity checked (`export_onnx`);

then the table: natural accuracy, attack accuracy @1 (class-bootstrap interval) and @5, KNN
distance, the paired difference to the original with its interval, Δ, and the verdict.

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

SCHEMA_VERSION = 2
STATE_FILE = "demo-state.json"
DATASETS = ("omniglot", "fashion-mnist")
# The default is the dataset whose one audit can separate the models it compares (docs/demo.md).
DEFAULT_DATASET = "omniglot"
TARGET_ARCH = "timm:test_resnet"  # a ResNet with full skips, small enough for a CPU
RESOLUTION = 32
PRIVATE_CLASSES = (0, 1, 2, 3, 4)  # Fashion-MNIST: T-shirt/top, Trouser, Pullover, Dress, Coat
PUBLIC_CLASSES = (5, 6, 7, 8, 9)  # Sandal, Shirt, Sneaker, Bag, Ankle boot
# 3e-3 rather than the recipe's 1e-3: the demo trains from scratch for a few hundred steps at most,
# and at 1e-3 test_resnet is still near chance after the quick run's 20 steps (measured: 19 %).
LR = 3e-3
BATCH_SIZE = 32
PLAIN_CNN = "mishield.models.plaincnn:plain_cnn"  # skip-free: as unlike the ResNet targets as possible
EFFICIENTNET = "timm:test_efficientnet"  # another family (depthwise blocks, squeeze-excitation)
# PPA's final selection scores random crops of 50-90 % and mirror images: made for faces, whose
# identity survives both. A mirrored character is often another character, and half of one is
# rarely legible, so for Omniglot the final selection keeps 80-100 % crops and no mirror (measured,
# docs/demo.md: with PPA's, the target's own confidence stayed under 0.5 for half the classes).
GLYPH_SELECTION = {"final_flip": 0.0, "final_scale": (0.8, 1.0)}

# The sizes, per dataset. Measured on the shared 2-core CPU so that the full demo stays under 10
# minutes and --quick under 1 minute on an idle machine (docs/demo.md has the measured times);
# `seconds` are those measurements per stage (one torch thread's CPU time), used only to say
# roughly how long is left, scaled by the pace of the stages already run.
# `hardened`: (stage, name, file, HardenConfig fields; "from_scratch" trains the architecture
# with TTS instead of fine-tuning the trained target; "lr_factor" scales LR).
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "omniglot": {
        "quick": {
            "data": {"characters": 8, "public_characters": None},
            "augmentation": "glyph", "target_epochs": 20,
            "hardened": [("rolss", "RoLSS", "rolss.pt", {"method": "rolss", "epochs": 5, "lr_factor": 1.0})],
            # 16 epochs, no pixel noise (`bench/omniglot_sizing.py --chars 8`, the demo's seed): test_efficientnet after
            # 8 epochs scored 60.8 %, whose interval reaches under the audit's floor (52 % here); after 16, 86.7 %
            # without train-eval's noise and 76.7 % with it (another seed at 8 epochs: 60.0 % and 45.8 %).
            # The full run keeps the evaluators its measured numbers came from.
            "evaluators": [(PLAIN_CNN, 5), (EFFICIENTNET, 16)], "eval_noise": 0.0,
            "prior": {"epochs": 6, "latent_dim": 64, "width": 16, "batch_size": 32, "lr": 2e-4},
            "attack": {"samples": 200, "candidates": 8, "iterations": 60, "keep": 4, "final_augmentations": 4,
                       "batch_size": 256, **GLYPH_SELECTION},
            "seconds": {"data": 1, "target": 10, "rolss": 3, "eval": 8, "eval2": 7, "prior": 16, "audit": 18, "export": 4},
        },
        "full": {
            "data": {"characters": None, "public_characters": None},
            "augmentation": "glyph", "target_epochs": 20,
            "hardened": [("rolss", "RoLSS", "rolss.pt", {"method": "rolss", "epochs": 5, "lr_factor": 1.0})],
            "evaluators": [(PLAIN_CNN, 12), (EFFICIENTNET, 15)], "eval_noise": 0.0,
            "prior": {"epochs": 20, "latent_dim": 64, "width": 16, "batch_size": 32, "lr": 2e-4},
            "attack": {"samples": 200, "candidates": 16, "iterations": 80, "keep": 12, "final_augmentations": 8,
                       "batch_size": 256, **GLYPH_SELECTION},
            "seconds": {"data": 2, "target": 52, "rolss": 15, "eval": 99, "eval2": 35, "prior": 51, "audit": 240, "export": 4},
        },
    },
    "fashion-mnist": {
        "quick": {
            "data": {"train_per_class": 40, "val_per_class": 20, "public_per_class": 40},
            "augmentation": "photo", "target_epochs": 3,
            "hardened": [("rolss_tts", "RoLSS+TTS", "rolss-tts.pt", {"method": "rolss", "from_scratch": True, "stage1_epochs": 1}),
                         ("ssf", "SSF", "ssf.pt", {"method": "ssf", "epochs": 1, "lr_factor": 0.1})],
            "evaluators": [(PLAIN_CNN, 8), (EFFICIENTNET, 8)],
            "prior": {"epochs": 2, "latent_dim": 32, "width": 16, "batch_size": 32, "lr": 3e-4},
            "attack": {"samples": 40, "candidates": 4, "iterations": 5, "keep": 4, "final_augmentations": 2, "batch_size": 40},
            "seconds": {"data": 1, "target": 2, "rolss_tts": 2, "ssf": 1, "eval": 2, "eval2": 2, "prior": 1, "audit": 1, "export": 3},
        },
        "full": {
            "data": {"train_per_class": 300, "val_per_class": 100, "public_per_class": 300},
            "augmentation": "photo", "target_epochs": 12,
            "hardened": [("rolss_tts", "RoLSS+TTS", "rolss-tts.pt", {"method": "rolss", "from_scratch": True, "stage1_epochs": 4}),
                         ("ssf", "SSF", "ssf.pt", {"method": "ssf", "epochs": 4, "lr_factor": 0.1}),
                         ("bido_rolss", "BiDO+RoLSS", "bido-rolss.pt",
                          {"method": "rolss", "from_scratch": True, "stage1_epochs": 4, "bido": True})],
            "evaluators": [(PLAIN_CNN, 10), (EFFICIENTNET, 10)],
            "prior": {"epochs": 20, "latent_dim": 64, "width": 32, "batch_size": 64, "lr": 3e-4},
            "attack": {"batch_size": 100},  # the default preset's budget; only the batch is sized for a CPU
            "seconds": {"data": 1, "target": 25, "rolss_tts": 25, "ssf": 10, "bido_rolss": 35, "eval": 45, "eval2": 20,
                        "prior": 110, "audit": 35, "export": 3},
        },
    },
}

StageLog = Callable[[str], None]


@dataclass(frozen=True)
class DemoConfig:
    """Which demo: `dataset` ("omniglot", the default, or "fashion-mnist"), `quick` (a tiny but
    real run), `device` ("auto", "cpu", "cuda", "cuda:N") and the training and attack `seed`."""

    dataset: str = DEFAULT_DATASET
    quick: bool = False
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise UsageError(f"`dataset` must be one of {', '.join(DATASETS)}, got {self.dataset!r}.")

    @property
    def size(self) -> dict[str, Any]:
        return SIZES[self.dataset]["quick" if self.quick else "full"]


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
    dataset: str = DEFAULT_DATASET
    private_classes: list = field(default_factory=list)  # Fashion-MNIST class ids, or Omniglot class folder names
    public_classes: list = field(default_factory=list)
    evaluators: list[str] = field(default_factory=list)  # the evaluation models' architectures

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "dataset": self.dataset,
            "out": str(self.out),
            "quick": self.quick,
            "device": self.device,
            "private_classes": self.private_classes,
            "public_classes": self.public_classes,
            "evaluators": self.evaluators,
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

        t0, c0 = time.perf_counter(), time.process_time()
        try:
            record = work() or {}
        except TrainingInterrupted as err:
            # The demo has no --resume: a plain rerun keeps every finished stage and redoes this one.
            what = str(err).split(";")[0]
            raise type(err)(f"the demo was stopped in stage {self._index(name)} {name} ({what}); rerun the same "
                            "command: the finished stages are kept and this one starts again.") from None
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        self.done[name] = {"settings": settings, "outputs": outputs, "record": record, "seconds": round(seconds, 2),
                           "cpu_seconds": round(cpu, 2), "finished": time.time()}
        self._save()
        self.ran.append({"name": name, "cached": False, "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2)})
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
        # This stage runs whatever an earlier run recorded for it; later ones unless finished before.
        rest = sum(self.seconds.get(s, 0) for s in self.plan[self.plan.index(name):] if s == name or s not in self.done)
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


def _plan(size: dict) -> list[str]:
    evals = [_eval_stage(i) for i in range(len(size["evaluators"]))]
    return ["data", "target", *(h[0] for h in size["hardened"]), *evals, "prior", "audit", "export"]


def _eval_stage(i: int) -> str:
    return "eval" if i == 0 else f"eval{i + 1}"


def _eval_file(i: int) -> str:
    return f"{_eval_stage(i)}.pt"


def run_demo(
    out: str | Path = "mishield-demo",
    *,
    config: DemoConfig | None = None,
    progress: ProgressCallback | None = None,
    on_epoch: EpochCallback | None = None,
    log: StageLog | None = None,
    **keywords,
) -> DemoResult:
    """Run (or continue) the demo in `out`; see the module docstring for the stages.

    `config` (`DemoConfig`) says which dataset, how big, on which device, with which seed; the
    former keywords `quick`, `device` and `seed` still work (deprecated). `progress` and
    `on_epoch` go to the library's trainers and the audit; `log` receives one line per stage
    (which stage runs, roughly how long is left).
    """
    from mishield.configs import resolve_config
    from mishield.runtime import resolve_device

    config = resolve_config("run_demo", config, keywords, DemoConfig)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"`out` {out} is a file; the demo writes a folder.")
    out.mkdir(parents=True, exist_ok=True)
    size, dev = config.size, str(resolve_device(config.device))
    stages = _Stages(out, _plan(size), size["seconds"], log)
    t0 = time.perf_counter()
    ctx = {"out": out, "size": size, "device": dev, "seed": config.seed, "progress": progress, "on_epoch": on_epoch,
           "quick": config.quick, "dataset": config.dataset}
    classes = _data_stage(stages, ctx)
    _model_stages(stages, ctx)
    report = _audit_stage(stages, ctx)
    onnx = _export_stage(stages, ctx)
    rows = demo_table(report)
    figure = write_figure(report, out / "audit", out / "demo.png")
    return DemoResult(out=out, quick=config.quick, rows=rows, report_html=out / "audit" / "report.html",
                      report_json=out / "audit" / "report.json", onnx=onnx, figure=figure, stages=stages.ran,
                      warnings=list(report.get("warnings") or []), seconds=time.perf_counter() - t0, device=dev,
                      dataset=config.dataset, private_classes=classes["private"], public_classes=classes["public"],
                      evaluators=[arch for arch, _ in size["evaluators"]])


def _data_stage(stages: _Stages, ctx: dict) -> dict:
    """The class-disjoint split, written into scratch folders and renamed, so a half-written split
    is never mistaken for data. Returns the private and public classes."""
    from mishield.data import materialize_fashion_mnist, materialize_omniglot

    size, out, omniglot = ctx["size"], ctx["out"], ctx["dataset"] == "omniglot"
    settings = {"dataset": ctx["dataset"], **size["data"]}
    if not omniglot:
        settings |= {"private": PRIVATE_CLASSES, "public": PUBLIC_CLASSES}

    def write(role: str, dest: Path) -> None:
        d = size["data"]
        if omniglot:
            drawers = {} if role == "private" else {"train_drawers": range(1, 21), "val_drawers": ()}
            materialize_omniglot(dest, role, characters_per_alphabet=d["characters" if role == "private" else "public_characters"],
                                 **drawers)
        elif role == "private":
            materialize_fashion_mnist(dest, PRIVATE_CLASSES, train_per_class=d["train_per_class"], val_per_class=d["val_per_class"])
        else:
            materialize_fashion_mnist(dest, PUBLIC_CLASSES, train_per_class=d["public_per_class"], val_per_class=1)

    def work() -> dict:
        for role in ("private", "public"):
            final, tmp = out / "data" / role, out / "data" / f".{role}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            write(role, tmp)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        if not omniglot:
            return {"private": list(PRIVATE_CLASSES), "public": list(PUBLIC_CLASSES)}
        return {role: sorted(p.name for p in (out / "data" / role / "train").iterdir() if p.is_dir())
                for role in ("private", "public")}

    return stages.run("data", settings, ["data/private", "data/public"], work)


def _model_stages(stages: _Stages, ctx: dict) -> None:
    """The original target, its hardened copies, the evaluation models and the prior."""
    from mishield.training.evaluator import (
        DEFAULT_EVAL_NOISE,
        EvalModelConfig,
        train_eval_model,
    )
    from mishield.training.prior import PriorTrainingConfig, train_prior

    out, size, dev, seed = ctx["out"], ctx["size"], ctx["device"], ctx["seed"]
    private, public = out / "data" / "private", out / "data" / "public"
    report = {"progress": ctx["progress"], "on_epoch": ctx["on_epoch"]}
    aug = size["augmentation"]
    stages.run("target", {"epochs": size["target_epochs"], "seed": seed, "arch": TARGET_ARCH, "lr": LR, "augmentation": aug,
                          **stages.stamp("data")}, ["original.pt"], lambda: _train_target(ctx))
    for stage, _, file, fields in size["hardened"]:
        depends = ("data",) if fields.get("from_scratch") else ("data", "target")
        stages.run(stage, {**fields, "seed": seed, "lr": LR, "augmentation": aug, **stages.stamp(*depends)}, [file],
                   lambda file=file, fields=fields: _harden(ctx, file, fields))
    noise = size.get("eval_noise", DEFAULT_EVAL_NOISE)
    for i, (arch, epochs) in enumerate(size["evaluators"]):
        name, file = _eval_stage(i), _eval_file(i)
        evaluator = EvalModelConfig(arch=arch, input_size=RESOLUTION, epochs=epochs, batch_size=BATCH_SIZE, lr=LR, device=dev,
                                    seed=seed + 1 + i, overwrite=True, workers=0, augmentation=aug, noise=noise)
        stages.run(name, {"arch": arch, "epochs": epochs, "seed": seed + 1 + i, "lr": LR, "augmentation": aug, "noise": noise,
                          **stages.stamp("data")}, [file],
                   lambda file=file, evaluator=evaluator: train_eval_model(private, out / file, config=evaluator, **report))
    prior_config = PriorTrainingConfig(resolution=RESOLUTION, seed=seed, **size["prior"])
    # "format" 2: the prior file keeps its discriminator, the audit's public feature space (an older cache lacks it)
    stages.run("prior", {**size["prior"], "seed": seed, "format": 2, **stages.stamp("data")}, ["prior.safetensors"], lambda: {"out": str(train_prior(
        public, out / "prior.safetensors", prior_config, device=dev, overwrite=True, **report))})


def _train_target(ctx: dict) -> dict:
    """The model a user would have: timm's test_resnet with all its skips, trained on the private classes."""
    import torch

    import mishield
    from mishield.data import load_image_folders
    from mishield.training import RunOptions, TrainingRecipe, evaluate_accuracy, fit

    out, size = ctx["out"], ctx["size"]
    splits = load_image_folders(out / "data" / "private")
    torch.manual_seed(ctx["seed"])
    loaded = mishield.load_model(TARGET_ARCH, num_classes=splits.num_classes, input_size=RESOLUTION)
    recipe = TrainingRecipe(schedule="finetune", epochs=size["target_epochs"], batch_size=BATCH_SIZE, lr=LR, seed=ctx["seed"],
                            augmentation=size["augmentation"])
    fit(loaded.model, splits, loaded.preprocessing, recipe, options=RunOptions(device=ctx["device"], workers=0),
        progress=ctx["progress"], on_epoch=ctx["on_epoch"])
    model = loaded.model.eval().cpu()
    accuracy = evaluate_accuracy(model, splits.val, loaded.preprocessing, batch_size=BATCH_SIZE)
    mishield.save_model(out / "original.pt", model, arch=TARGET_ARCH, num_classes=splits.num_classes, surgery=None,
                        preprocessing=loaded.preprocessing, extra={"classes": splits.classes, "training": recipe.to_dict()},
                        overwrite=True)
    return {"natural_acc": accuracy}


def _harden(ctx: dict, file: str, fields: dict) -> dict:
    """One hardened copy: surgery on the trained target and fine-tuning (at `lr_factor` x LR: it is
    already trained), or with `from_scratch` the architecture trained two-stage (TTS) with the
    original's total epoch budget: `stage1_epochs` with skips, the rest without."""
    import mishield
    from mishield.data import load_image_folders
    from mishield.hardening import HardenConfig

    out, size = ctx["out"], ctx["size"]
    private = out / "data" / "private"
    run = {"device": ctx["device"], "workers": 0, "seed": ctx["seed"], "overwrite": True, "batch_size": BATCH_SIZE,
           "augmentation": size["augmentation"], "method": fields["method"], "bido": fields.get("bido", False)}
    report = {"progress": ctx["progress"], "on_epoch": ctx["on_epoch"]}
    if fields.get("from_scratch"):
        m = fields["stage1_epochs"]
        config = HardenConfig(schedule="tts", epochs=size["target_epochs"] - m, stage1_epochs=m, lr=LR, **run)
        spec = {"num_classes": load_image_folders(private, verify=False).num_classes, "input_size": RESOLUTION}
        result = mishield.harden(TARGET_ARCH, config=config, data=private, out=out / file, load_options=spec, **report)
    else:
        config = HardenConfig(schedule="finetune", epochs=fields["epochs"], lr=LR * fields["lr_factor"], **run)
        result = mishield.harden(out / "original.pt", config=config, data=private, out=out / file, **report)
    return {"metrics": result.metrics, "seconds": round(result.seconds, 2)}


def _audit_stage(stages: _Stages, ctx: dict) -> dict:
    """One audit of every model, the original first: the Δ and paired columns are against it."""
    import mishield
    from mishield.audit.config import AuditConfig

    out, size = ctx["out"], ctx["size"]
    files = [out / "original.pt", *(out / h[2] for h in size["hardened"])]
    evaluators = [out / _eval_file(i) for i in range(len(size["evaluators"]))]
    settings = {"models": [str(f) for f in files], "attack": size["attack"], "seed": ctx["seed"],
                **stages.stamp(*stages.plan[:stages.plan.index("audit")])}

    def work() -> None:
        # The Fashion-MNIST --quick run is a smoke run: its evaluators may stay below the trust
        # floor, which the report then states as a warning (and no gate is set).
        weak = ctx["quick"] and ctx["dataset"] == "fashion-mnist"
        config = AuditConfig.preset(**size["attack"], seed=ctx["seed"], device=ctx["device"], overwrite=True,
                                    allow_weak_evaluator=weak, attacks=("ppa",))
        mishield.audit(files, data=out / "data" / "private", prior=out / "prior.safetensors", eval_model=evaluators,
                       config=config, out=out / "audit", progress=ctx["progress"])

    stages.run("audit", settings, ["audit/report.json", "audit/report.html"], work)
    return json.loads((out / "audit" / "report.json").read_text())


def _export_stage(stages: _Stages, ctx: dict) -> dict:
    import mishield

    out = ctx["out"]
    stage, _, file, _ = ctx["size"]["hardened"][0]

    def work() -> dict:
        loaded = mishield.load_model(out / file)
        report = mishield.export_onnx(loaded.model, (out / file).with_suffix(".onnx"),
                                      input_size=loaded.preprocessing.input_size, overwrite=True)
        return {"path": str(report.path), "max_abs_diff": report.max_abs_diff, "parity": True, "atol": 1e-4}

    return stages.run("export", stages.stamp(stage), [str(Path(file).with_suffix(".onnx"))], work)


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


FIGURE_CLASSES = 8  # rows of the README picture: enough to see the characters, small enough to read


def write_figure(report: dict, audit_dir: Path, dest: Path) -> Path:
    """One picture for the README: the original's and the first hardened model's reconstruction
    grids side by side (each row a class: reconstructions, gap, real private images), captioned
    with the measured numbers. With many classes, FIGURE_CLASSES rows spread evenly over the
    classes the grid holds (the first MAX_GRID_ROWS attacked ones), never chosen by how they look."""
    from PIL import Image, ImageDraw

    from mishield.fileio import atomic_output

    rows = demo_table(report)
    captions, grids = [], []
    for m, row in list(zip(report["models"], rows))[:2]:
        with Image.open(audit_dir / m["grid"]) as img:
            grid = _some_rows(img.convert("RGB"), min(len(m["per_class"]), MAX_GRID_ROWS))
        scale = max(1, 256 // grid.height)
        grids.append(grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST))
        lo, hi = row["attack_acc1_ci95"]
        caption = [f"{row['model']}", f"natural acc {_pct(row['natural_acc'])}",
                   f"attack acc@1 {_pct(row['attack_acc1'])} [{_pct(lo)}, {_pct(hi)}]"]
        if row["paired_diff"] is not None:
            dlo, dhi = row["paired_diff_ci95"]
            caption.append(f"vs original {100 * row['paired_diff']:+.1f} pts [{100 * dlo:+.1f}, {100 * dhi:+.1f}]")
        captions.append(caption)
    top = 16 * max(len(c) for c in captions) + 8  # the same for every panel, so the class rows line up
    panels = []
    for caption, grid in zip(captions, grids):
        panel = Image.new("RGB", (max(grid.width, 300), grid.height + top), "white")
        draw = ImageDraw.Draw(panel)
        for j, line in enumerate(caption):
            draw.text((4, 4 + 16 * j), line, fill="black")
        panel.paste(grid, (0, top))
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


MAX_GRID_ROWS = 100  # mishield.audit.report.MAX_SHOWN_CLASSES: the grids hold at most this many classes


def _some_rows(grid, rows: int):
    """FIGURE_CLASSES of the grid's `rows` equal-height class rows, spread evenly (all when fewer)."""
    from PIL import Image

    if rows <= FIGURE_CLASSES:
        return grid
    height = grid.height // rows
    picked = [round(i * (rows - 1) / (FIGURE_CLASSES - 1)) for i in range(FIGURE_CLASSES)]
    out = Image.new("RGB", (grid.width, height * len(picked)), "white")
    for j, r in enumerate(picked):
        out.paste(grid.crop((0, r * height, grid.width, (r + 1) * height)), (0, j * height))
    return out


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"
