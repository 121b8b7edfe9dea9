"""Privacy/utility trade-off of each defence, with the training seed as the unit (issue 23, issue 19).

    nice -n 10 python bench/privacy_tradeoff.py --dataset omniglot --out out/tradeoff-omniglot --seeds 5
    nice -n 10 python bench/privacy_tradeoff.py --dataset omniglot --out out/tradeoff-omniglot --seeds 5 --only 1,3  # a 2nd process
    python bench/privacy_tradeoff.py --dataset omniglot --out out/tradeoff-omniglot --seeds 5 --report   # tables only

The question, for every defence D: how much less (or more) does a model-inversion attack recover
from a model trained with D than from the same architecture trained the same way without it, and
what does D cost in natural accuracy? Everything below was written down before the first run.

Setting (`--dataset omniglot`, the default). Private: the 129 characters of Japanese (katakana),
Korean and Sanskrit from the embedded Omniglot, drawers 1-15 train (1935 images), 16-20
validation (645); public: the 113 characters of the other five alphabets, all 20 drawers (no
class shared). The target is timm's `test_resnet` (a ResNet with full skips) at 32 px with the
glyph augmentation (`mishield.data.glyph_train_transform`), trained from scratch; the sizes are
those of `mishield demo --dataset omniglot` (mishield/demo.py, docs/demo.md), so the study
measures the demo's setting with power. `--dataset fashion-mnist --idx-folder DIR` runs the same
protocol on Fashion-MNIST classes 0-4 (private) and 5-9 (public) for comparison with the older runs.

Shared by every seed (the attacker's and the judge's tools, trained once with fixed seeds and
kept in OUT): the DCGAN prior on the public data, and two evaluation models of different
architectures on the private data (mishield's skip-free CNN and timm's `test_efficientnet`).

Per training seed s = 0, 1, ..., `--seeds` - 1 (the unit of replication): every model is trained
again with seed s (initialisation, data order, augmentation), then all of them are audited in ONE
`mishield.audit` call with the undefended model first (the same latent pool and crops for all, so
within a seed every paired difference is exact), attack seed s, attacks `ppa`, `lomma`, `blackbox`
and `transfer` (passed explicitly, so a later change of the audit's default does not change this
study; the gradient-free `blackbox` and the surrogate-only `transfer` were added before the first
audit ran, so that a defence that only masks gradients cannot look strong, docs/audit.md
"Masking"), both evaluators, with the budget and final selection of `Setting.attack` (for
Omniglot: 43 of the 129 private classes, every third, so all three alphabets; 12 models under four
attacks per seed make the audit the dearest stage, and its cost grows with the classes). `lomma`
and `transfer` attack each model through one surrogate distilled from that model on the public
data (`mishield.train_surrogate`).

The rows (DEFENCES; "from scratch" means E epochs like the undefended model; "+ RoLSS" means
RoLSS surgery on that model, then `Setting.finetune_epochs` of fine-tuning at the training lr with
the recipe's decay and the same defence kept on, what `mishield harden --method rolss --lr 3e-3`
does to a trained file; on the demo's 24-character set a RoLSS copy fine-tuned at a tenth of it
kept a flat softmax (the true class's mean probability on real validation images 0.18 after 3
epochs, 0.30 at a third of the lr after 5, 0.63 at the full lr), which the audit reads as classes
the attack did not reach):

* none: the undefended target, from scratch;
* RoLSS / SSF (k = 0.2): surgery on `none`, then fine-tuning (Koh et al., ECCV 2024);
* TTS: RoLSS trained two-stage from scratch, E/4 epochs with skips, the rest without;
* BiDO (lx 0.05, ly 0.5) from scratch, and BiDO + RoLSS;
* negative LS: label smoothing -0.05 from scratch (0 for the first half of the run, ramped in over
  a quarter: Struppek et al., ICLR 2024), and negative LS + RoLSS (the factor held at -0.05);
* erasing: MIDRE's random erasing p 1.0, area 0.1-0.8, from scratch (TMLR 2025), and + RoLSS;
* freeze-stages: TL-DMI (Ho et al., CVPR 2024): the whole model pre-trained on the public data
  for `--public-epochs`, then the private data with the stem and the first 2 stages frozen;
  and freeze-stages + RoLSS (the same stages kept frozen while fine-tuning).

So each "X + RoLSS" row differs from "X" exactly as "RoLSS" differs from "none" (surgery and the
same fine-tuning), and RoLSS's extra epochs are counted in its row, not hidden.

Analysis (fixed before the first run; the tables `--report` prints follow it):

1. Outcome. For seed s and model m, A_s(m) is the audit's worst-case attack accuracy @1: for each
   attack the most leaky of the two evaluators, then the stronger attack (docs/audit.md "Worst
   case"), over the K kept reconstructions of every attacked class. N_s(m) is the natural accuracy
   on the 645 validation images.
2. Within a seed, d_s(D) = A_s(D) - A_s(none) in percentage points, with the audit's paired
   class-bootstrap 95 % interval (the class as unit, the same classes for both models). This
   interval says how well one audit pins down the difference for that pair of trained models.
3. Over seeds (the primary result): the mean of d_s(D) over the n seeds that finished, with the
   95 % Student-t interval mean +- t(0.975, n - 1) sd / sqrt(n). This is the interval that counts,
   because a defence is a training procedure: it includes the variation from retraining both
   models and from the attack's own randomness, which one audit's class bootstrap cannot see.
4. What counts as an effect: D reduces attack accuracy when the upper end of the t-interval in 3
   is below 0, increases it when the lower end is above 0; otherwise this study shows no effect at
   its size (which is not evidence of no effect: the table gives the interval, i.e. which effects
   it rules out). Eleven defences are compared with one baseline, so about one in two such
   studies would show one "effect" among them by chance at 95 % each; an effect is called robust
   only if the Bonferroni interval (level 1 - 0.05/11) also excludes 0, and the table marks both.
5. Cost: the per-seed natural-accuracy difference N_s(D) - N_s(none), its mean and t-interval over
   seeds, and Δ = (mean attack-accuracy drop) / (mean natural-accuracy drop), Koh et al.'s column,
   when the mean natural-accuracy drop is positive (n/a otherwise).
6. Descriptive only (not tested): each attack's own paired difference (ppa, lomma, blackbox, transfer), how many seeds
   have d_s < 0, each model's attack accuracy with its class-bootstrap interval, the KNN distance.
7. Every row that ran is reported, whatever it shows; a run with fewer seeds than asked for is
   labelled partial with the number of seeds in it.

Resumable: every model, surrogate and audit is a file in OUT, written atomically and skipped when
present (an interrupted fine-tuning continues from its .train-state); a killed run continues with
the same command. OUT/study.json holds the per-seed results and is rewritten after every seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Each row: how it is made. "scratch": trained like the target with these recipe fields;
# "harden": mishield.harden on the model of `base` with these HardenConfig fields.
DEFENCES: dict[str, dict] = {
    "none": {"kind": "scratch"},
    "RoLSS": {"kind": "harden", "base": "none", "method": "rolss"},
    "SSF": {"kind": "harden", "base": "none", "method": "ssf", "alpha": 0.2},
    "TTS": {"kind": "tts"},
    "BiDO": {"kind": "scratch", "bido": True},
    "BiDO+RoLSS": {"kind": "harden", "base": "BiDO", "method": "rolss", "bido": True},
    "negLS": {"kind": "scratch", "neg_ls": -0.05},
    "negLS+RoLSS": {"kind": "harden", "base": "negLS", "method": "rolss", "neg_ls": -0.05, "neg_ls_start": 0, "neg_ls_ramp": 0},
    "erase": {"kind": "scratch", "erase": (1.0, 0.1, 0.8)},
    "erase+RoLSS": {"kind": "harden", "base": "erase", "method": "rolss", "erase": (1.0, 0.1, 0.8)},
    "freeze": {"kind": "tl_dmi", "freeze_stages": 2},
    "freeze+RoLSS": {"kind": "harden", "base": "freeze", "method": "rolss", "freeze_stages": 2},
}
ATTACKS = "ppa,lomma,blackbox,transfer"  # explicit: the study does not follow later changes of the audit's default


@dataclass(frozen=True)
class Setting:
    """The sizes of one dataset's study (for Omniglot those of `mishield demo --dataset omniglot`
    when the study was designed; written out here so that a later change of the demo does not
    change the study)."""

    name: str
    arch: str
    resolution: int
    augmentation: str
    epochs: int  # every model trained from scratch
    lr: float
    batch_size: int
    finetune_epochs: int  # RoLSS / SSF (+ a defence) on a trained model, at the same lr
    public_epochs: int  # TL-DMI's public pre-training
    eval_models: tuple[tuple[str, int], ...]  # (architecture, epochs), trained with `augmentation`
    prior: dict  # PriorTrainingConfig fields
    surrogate: dict  # SurrogateConfig fields
    attack: dict  # the audit's budget (AuditConfig.preset("default", ...) fields)
    classes: int | None = None  # attacked classes, spread evenly over the private ones (None: all)
    smoke: bool = False  # a pipeline check: weak evaluators allowed


SETTINGS = {
    "omniglot": Setting(
        "omniglot", "timm:test_resnet", 32, "glyph", epochs=20, lr=3e-3, batch_size=32, finetune_epochs=5, public_epochs=10,
        eval_models=(("mishield.models.plaincnn:plain_cnn", 15), ("timm:test_efficientnet", 15)),
        prior={"epochs": 20, "width": 16, "latent_dim": 64, "batch_size": 32, "lr": 2e-4},
        # torchvision's ResNet-18 (mishield's default surrogate): after 10 epochs it agreed with a
        # trained target on 66 % of held-out public characters, timm's test_resnet on 42 %
        # (bench/omniglot_sizing.py); 5 epochs keep the 12 surrogates of a seed affordable.
        surrogate={"arch": "torchvision:resnet18", "epochs": 5},
        attack={"samples": 200, "candidates": 8, "keep": 4, "final_augmentations": 8, "iterations": 50,
                "final_flip": 0.0, "final_scale": (0.8, 1.0), "batch_size": 256}, classes=43),
    "fashion-mnist": Setting(
        "fashion-mnist", "timm:test_resnet", 32, "photo", epochs=12, lr=3e-3, batch_size=32, finetune_epochs=4, public_epochs=6,
        eval_models=(("mishield.models.plaincnn:plain_cnn", 10), ("timm:test_efficientnet", 10)),
        prior={"epochs": 20, "width": 32, "latent_dim": 64, "batch_size": 64, "lr": 3e-4},
        surrogate={"arch": "torchvision:resnet18", "epochs": 10},
        attack={"batch_size": 100}),
}
# `--smoke`: the Omniglot protocol at a size that only checks the pipeline (a few minutes), never a result.
SMOKE = {"epochs": 2, "finetune_epochs": 1, "public_epochs": 1, "eval_models": (("mishield.models.plaincnn:plain_cnn", 1),
             ("timm:test_efficientnet", 1)), "prior": {"epochs": 1, "width": 16, "latent_dim": 16, "batch_size": 64, "lr": 2e-4},
             "surrogate": {"arch": "timm:test_resnet", "epochs": 1},
             "attack": {"samples": 20, "candidates": 2, "keep": 1, "final_augmentations": 1, "iterations": 2, "batch_size": 64},
             "classes": 4, "smoke": True}


# ---------------------------------------------------------------------------------------------
# Data


def write_omniglot(out: Path) -> tuple[Path, Path]:
    from mishield.data import materialize_omniglot

    private, public = out / "private", out / "public"
    if not (private / "val").is_dir():
        materialize_omniglot(private, "private", overwrite=True)
    if not (public / "train").is_dir():
        materialize_omniglot(public, "public", train_drawers=range(1, 21), val_drawers=(), overwrite=True)
    return private, public


def read_idx(folder: Path, stem: str):
    import numpy as np

    path = next((p for p in (folder / f"{stem}.gz", folder / stem) if p.exists()), None)
    if path is None:
        sys.exit(f"error: {folder} has no {stem}[.gz]; install dataset-fashion-mnist or pass the IDX folder.")
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * dims).reshape(shape)


def write_fashion(idx: Path, out: Path, train_per_class: int = 1000, val_per_class: int = 200) -> tuple[Path, Path]:
    import numpy as np
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


# ---------------------------------------------------------------------------------------------
# The shared tools


def shared_tools(st: Setting, private: Path, public: Path, out: Path, log) -> tuple[Path, list[Path]]:
    """The prior and the evaluation models, trained once (seeds fixed) and kept in OUT."""
    from mishield.training.evaluator import EvalModelConfig, train_eval_model
    from mishield.training.prior import PriorTrainingConfig, train_prior

    prior = out / "prior.safetensors"
    if not prior.exists():
        log("training the prior")
        train_prior(public, prior, PriorTrainingConfig(resolution=st.resolution, seed=0, **st.prior), device="cpu", overwrite=True,
                    resume=_state(prior).exists())
    evaluators = []
    for i, (arch, epochs) in enumerate(st.eval_models):
        path = out / ("eval.pt" if i == 0 else f"eval{i + 1}.pt")
        if not path.exists():
            log(f"training evaluator {i + 1} ({arch})")
            config = EvalModelConfig(arch=arch, input_size=st.resolution, epochs=epochs, lr=st.lr, batch_size=st.batch_size,
                                     device="cpu", seed=100 + i, overwrite=True, workers=0, augmentation=st.augmentation,
                                     resume=_state(path).exists())
            train_eval_model(private, path, config=config)
        evaluators.append(path)
    return prior, evaluators


# ---------------------------------------------------------------------------------------------
# One seed's models


def _state(path: Path) -> Path:
    from mishield.training.state import state_path_for

    return state_path_for(path)


def _file(out: Path, seed: int, name: str) -> Path:
    return out / f"seed{seed}" / f"{name.replace('+', '-')}.pt"


def _recipe(st: Setting, seed: int, spec: dict):
    from mishield.training import BiDOConfig, TrainingRecipe

    return TrainingRecipe(schedule="finetune", epochs=st.epochs, lr=st.lr, batch_size=st.batch_size, seed=seed,
                          augmentation=st.augmentation, bido=BiDOConfig() if spec.get("bido") else None,
                          label_smoothing=spec.get("neg_ls"), erase=spec.get("erase"),
                          freeze_stages=spec.get("freeze_stages", 0))


def train_scratch(st: Setting, private: Path, public: Path, path: Path, seed: int, spec: dict) -> None:
    """`none`, BiDO, negative LS, erasing (fit from scratch) and TL-DMI (public pre-training, then frozen stages)."""
    import torch

    import mishield
    from mishield.data import load_image_folders
    from mishield.training import RunOptions, fit, train_tl_dmi

    splits = load_image_folders(private)
    torch.manual_seed(seed)
    loaded = mishield.load_model(st.arch, num_classes=splits.num_classes, input_size=st.resolution)
    recipe, options = _recipe(st, seed, spec), RunOptions(device="cpu", workers=0)
    if spec["kind"] == "tl_dmi":
        model = train_tl_dmi(loaded.model, load_image_folders(public), splits, loaded.preprocessing, recipe,
                             public_epochs=st.public_epochs, options=options).model
    else:
        model = fit(loaded.model, splits, loaded.preprocessing, recipe, options=options).model
    mishield.save_model(path, model.eval(), arch=st.arch, num_classes=splits.num_classes, surgery=None,
                        preprocessing=loaded.preprocessing, extra={"classes": splits.classes, "training": recipe.to_dict()},
                        overwrite=True)


def train_hardened(st: Setting, private: Path, path: Path, seed: int, spec: dict, base: Path | None) -> None:
    """RoLSS / SSF (+ a defence) fine-tuned from `base`, or TTS from scratch (`base` None)."""
    import mishield
    from mishield.data import load_image_folders
    from mishield.hardening import HardenConfig

    fields = {k: v for k, v in spec.items() if k not in ("kind", "base")}
    common = {"batch_size": st.batch_size, "device": "cpu", "workers": 0, "seed": seed, "overwrite": True,
              "augmentation": st.augmentation}
    resume = _state(path).exists()
    if base is None:  # TTS: the original's total epoch budget, a quarter with skips
        m = max(1, st.epochs // 4)
        config = HardenConfig(method="rolss", schedule="tts", stage1_epochs=m, epochs=st.epochs - m, lr=st.lr, resume=resume,
                              **common)
        classes = load_image_folders(private, verify=False).num_classes
        mishield.harden(st.arch, config=config, data=private, out=path,
                        load_options={"num_classes": classes, "input_size": st.resolution})
        return
    config = HardenConfig(schedule="finetune", epochs=st.finetune_epochs, lr=st.lr, resume=resume,
                          **common, **fields)
    mishield.harden(base, config=config, data=private, out=path)


def train_seed(st: Setting, private: Path, public: Path, out: Path, seed: int, log) -> dict[str, Path]:
    files = {}
    for name, spec in DEFENCES.items():
        path = _file(out, seed, name)
        files[name] = path
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        if spec["kind"] in ("scratch", "tl_dmi"):
            train_scratch(st, private, public, path, seed, spec)
        else:
            train_hardened(st, private, path, seed, spec, files.get(spec.get("base")) if spec["kind"] == "harden" else None)
        log(f"seed {seed}: {name} trained in {time.perf_counter() - t0:.0f} s")
    return files


def surrogates_for(st: Setting, public: Path, files: dict[str, Path], log) -> list[Path]:
    from mishield.training.distillation import SurrogateConfig, train_surrogate

    paths = []
    for name, model in files.items():
        path = model.with_suffix(".surrogate.pt")
        if not path.exists():
            t0 = time.perf_counter()
            config = SurrogateConfig(arch=st.surrogate["arch"], epochs=st.surrogate["epochs"], device="cpu", overwrite=True,
                                     workers=0, seed=0, resume=_state(path).exists())
            result = train_surrogate(model, public, path, config=config)
            log(f"{model.parent.name}: surrogate of {name} (agreement {result.agreement:.2f}) in {time.perf_counter() - t0:.0f} s")
        paths.append(path)
    return paths


def audit_seed(st: Setting, private: Path, prior: Path, evaluators: list[Path], files: dict[str, Path],
               surrogates: list[Path], out: Path, seed: int, log) -> dict:
    import mishield
    from mishield.audit.config import AuditConfig
    from mishield.data import load_image_folders

    dest = out / f"seed{seed}" / "audit"
    if not (dest / "report.json").exists():
        t0 = time.perf_counter()
        total = load_image_folders(private, verify=False).num_classes
        classes = None if st.classes is None else tuple(sorted({round(i * (total - 1) / (st.classes - 1)) for i in range(st.classes)}))
        config = AuditConfig.preset("default", **st.attack, seed=seed, attacks=ATTACKS, classes=classes, device="cpu",
                                    overwrite=True, allow_weak_evaluator=st.smoke)
        mishield.audit(list(files.values()), data=private, prior=prior, eval_model=evaluators, surrogates=surrogates,
                       config=config, out=dest)
        log(f"seed {seed}: audit in {time.perf_counter() - t0:.0f} s")
    return json.loads((dest / "report.json").read_text())


# ---------------------------------------------------------------------------------------------
# Analysis (the module docstring's steps 1-7)


def _per_class(entry: dict):
    import numpy as np

    return np.array([c["attack_acc1"] for c in entry["per_class"]])


def seed_rows(report: dict, seed: int) -> dict[str, dict]:
    """Step 1-2 for one seed: each model's figures and its paired difference to `none`, per attack too."""
    from mishield.demo import demo_table

    table = demo_table(report)
    rows = {}
    base = report["models"][0]
    for name, m, row in zip(DEFENCES, report["models"], table):
        attacks = {}
        for a in m.get("attacks") or []:
            b = next(x for x in base.get("attacks") or [] if x["attack"] == a["attack"])
            attacks[a["attack"]] = {"attack_acc1": a["metrics"]["attack_acc1"],
                                    "paired_diff": float((_per_class(a) - _per_class(b)).mean()),
                                    "decides": a.get("decides", True)}
        masking = m.get("masking") or {}
        rows[name] = {**row, "model": name, "seed": seed, "strongest_attack": m.get("attack"), "attacks": attacks,
                      "knn_judge_acc1": m["metrics"].get("knn_judge_acc1"),
                      "false_positive_share": m["metrics"].get("false_positive_share"),
                      "masking_signals": [s["kind"] for s in masking.get("signals") or []],
                      "agreement_gap": _gap(masking.get("surrogate_agreement"))}
    return rows


def _gap(agreement: dict | None) -> float | None:
    """Surrogate agreement on natural minus generated images (docs/audit.md "Masking")."""
    if not agreement or agreement.get("natural") is None or agreement.get("generated") is None:
        return None
    return agreement["natural"] - agreement["generated"]


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student's t interval over seeds."""
    from mishield.audit.stats import t_quantile

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan"), float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(1 - (1 - level) / 2, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def summarise(per_seed: list[dict[str, dict]]) -> list[dict]:
    """Steps 3-6: one summary per defence over the seeds that finished."""
    out = []
    comparisons = len(DEFENCES) - 1
    for name in DEFENCES:
        rows = [s[name] for s in per_seed if name in s]
        base = [s["none"] for s in per_seed if name in s]
        att = t_interval([r["attack_acc1"] for r in rows])
        nat = t_interval([r["natural_acc"] for r in rows])
        row = {"defence": name, "seeds": len(rows), "natural_acc": nat, "attack_acc1": att}
        if name != "none":
            d = [r["attack_acc1"] - b["attack_acc1"] for r, b in zip(rows, base)]
            dn = [r["natural_acc"] - b["natural_acc"] for r, b in zip(rows, base)]
            diff, bonf = t_interval(d), t_interval(d, 1 - 0.05 / comparisons)
            acc_drop = -t_interval(dn)[0]
            row |= {"paired_diff": diff, "paired_diff_bonferroni": bonf, "natural_diff": t_interval(dn),
                    "seeds_lower": sum(x < 0 for x in d), "delta": (-diff[0] / acc_drop) if acc_drop > 0 else None,
                    "effect": _effect(diff, bonf),
                    "per_attack": {a: t_interval([r["attacks"][a]["paired_diff"] for r in rows if a in r["attacks"]])
                                   for a in ATTACKS.split(",") if any(a in r["attacks"] for r in rows)}}
        out.append(row)
    return out


def _effect(diff: tuple, bonf: tuple) -> str:
    if math.isnan(diff[1]):
        return "n/a (one seed)"
    if diff[2] < 0:
        return "reduces (robust)" if bonf[2] < 0 else "reduces"
    if diff[1] > 0:
        return "increases (robust)" if bonf[1] > 0 else "increases"
    return "no effect shown"


def markdown(doc: dict) -> str:
    """The seed-level table, then every seed's rows with the audit's own intervals."""
    def pct(v):
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"

    def pts(t):
        return f"{100 * t[0]:+.1f} [{100 * t[1]:+.1f}, {100 * t[2]:+.1f}]" if not math.isnan(t[1]) else f"{100 * t[0]:+.1f}"

    attacks = doc["attacks"].split(",")
    n = max((r["seeds"] for r in doc["summary"]), default=0)
    status = "" if n >= doc["seeds_asked"] else f" (PARTIAL: {n} of {doc['seeds_asked']} seeds)"
    lines = [(f"Seed-level summary{status}: mean over seeds [95 % t-interval over seeds]; attack accuracy is the worst case "
             f"of {doc['attacks']} under two evaluators."), "",
             ("| defence | seeds | natural acc % | attack acc@1 % | paired diff vs none, pts | seeds lower | "
             "Bonferroni interval, pts | natural acc diff, pts | Δ | reading | "
             + " | ".join(f"{a} diff, pts" for a in attacks) + " |"),
             "|---" * (10 + len(attacks)) + "|"]
    for r in doc["summary"]:
        nat, att = r["natural_acc"], r["attack_acc1"]
        cells = [r["defence"], str(r["seeds"]), f"{pct(nat[0])} [{pct(nat[1])}, {pct(nat[2])}]",
                 f"{pct(att[0])} [{pct(att[1])}, {pct(att[2])}]"]
        if "paired_diff" in r:
            pa = r["per_attack"]
            cells += [pts(r["paired_diff"]), f"{r['seeds_lower']}/{r['seeds']}", pts(r["paired_diff_bonferroni"]),
                      pts(r["natural_diff"]), "n/a" if r["delta"] is None else f"{r['delta'] + 0.0:.2f}", r["effect"],
                      *(pts(pa.get(a, (float("nan"),) * 3)) for a in attacks)]
        else:
            cells += ["baseline", "", "", "", "", "", *([""] * len(attacks))]
        lines.append("| " + " | ".join(cells) + " |")
    seeds = [s["none"]["seed"] for s in doc["per_seed"]]
    lines += ["", ("Per seed: natural acc % / attack acc@1 % [the audit's 95 % class-bootstrap interval]; paired difference "
              "vs none in points [the audit's paired interval]:"), "",
              "| defence | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---" * (len(seeds) + 1) + "|"]
    for name in DEFENCES:
        cells = []
        for s in doc["per_seed"]:
            r = s[name]
            cell = f"{pct(r['natural_acc'])} / {pct(r['attack_acc1'])} [{pct(r['attack_acc1_ci95'][0])}, {pct(r['attack_acc1_ci95'][1])}]"
            if r["paired_diff"] is not None:
                lo, hi = r["paired_diff_ci95"]
                cell += f"; {100 * r['paired_diff']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines + attack_and_judge_tables(doc)) + "\n"


def attack_and_judge_tables(doc: dict) -> list[str]:
    """Descriptive (step 6): every defence under every attack, and what the other judges and the
    masking diagnostics said, as means over the seeds (min to max in brackets)."""
    def spread(values):
        values = [v for v in values if v is not None]
        if not values:
            return "n/a"
        mean = 100 * sum(values) / len(values)
        return f"{mean:.1f} [{100 * min(values):.1f} to {100 * max(values):.1f}]" if len(values) > 1 else f"{mean:.1f}"

    attacks = doc["attacks"].split(",")
    lines = ["", ("Every defence under every attack: attack accuracy @1 % of each attack (its more leaky evaluator), "
                  "mean over seeds [min to max]; the worst case above is the highest of them."), "",
             "| defence | " + " | ".join(attacks) + " | strongest (seeds) |", "|---" * (len(attacks) + 2) + "|"]
    for name in DEFENCES:
        rows = [s[name] for s in doc["per_seed"] if name in s]
        strongest = {}
        for r in rows:
            strongest[r["strongest_attack"]] = strongest.get(r["strongest_attack"], 0) + 1
        cells = [spread([r["attacks"].get(a, {}).get("attack_acc1") for r in rows]) for a in attacks]
        lines.append(f"| {name} | " + " | ".join(cells) + " | " + ", ".join(f"{k} {v}" for k, v in sorted(strongest.items())) + " |")
    lines += ["", ("Judges and masking: the worst case's attack accuracy @1 by its evaluator and by the KNN judge in the "
                   "audit's first feature space (the prior's discriminator where the prior file has one, else the first evaluator's), the share of the evaluator's hits the judge rejects, "
                   "mean over seeds [min to max]; masking signals and verdicts counted over seeds."), "",
              ("| defence | evaluator % | KNN judge % | false-positive share % | masking signals | verdicts | "
               "surrogate agreement gap, pts | gap minus none's, pts |"),
              "|---|---|---|---|---|---|---|---|"]
    for name in DEFENCES:
        rows = [s[name] for s in doc["per_seed"] if name in s]
        excess = [r["agreement_gap"] - s["none"]["agreement_gap"] for s in doc["per_seed"] if name in s
                  for r in [s[name]] if r.get("agreement_gap") is not None and s["none"].get("agreement_gap") is not None]
        signals = [k for r in rows for k in r.get("masking_signals") or []]
        verdicts = {}
        for r in rows:
            verdicts[r.get("verdict")] = verdicts.get(r.get("verdict"), 0) + 1
        lines.append(f"| {name} | {spread([r['attack_acc1'] for r in rows])} | {spread([r.get('knn_judge_acc1') for r in rows])} | "
                     f"{spread([r.get('false_positive_share') for r in rows])} | "
                     f"{', '.join(f'{k} x{signals.count(k)}' for k in sorted(set(signals))) or 'none'} | "
                     f"{', '.join(f'{k} {v}' for k, v in sorted(verdicts.items(), key=str))} | "
                     f"{spread([r.get('agreement_gap') for r in rows])} | {'' if name == 'none' else spread(excess)} |")
    return lines


# ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", choices=("omniglot", "fashion-mnist"), default="omniglot")
    ap.add_argument("--idx-folder", type=Path, help="fashion-mnist: the folder of the four IDX files")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "tradeoff-omniglot")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--only", type=lambda v: [int(x) for x in v.split(",")], default=None,
                    help="run only these seeds (e.g. 1,3: a second process beside one running 0,2,4, once the "
                         "prior and evaluators exist); the tables still cover every finished seed")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: a good neighbour on a shared machine)")
    ap.add_argument("--report", action="store_true", help="only print the tables of the seeds that finished")
    ap.add_argument("--smoke", action="store_true", help="a tiny run that checks the pipeline only (no result)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    log_file = args.out / "study.log"

    def log(line: str) -> None:
        stamped = f"{time.strftime('%H:%M:%S')} {line}"
        print(stamped, file=sys.stderr, flush=True)
        with log_file.open("a") as f:
            f.write(stamped + "\n")

    st = SETTINGS[args.dataset]
    if args.smoke:
        st = dataclasses.replace(st, name=f"{st.name} (smoke)", **SMOKE)
    if args.dataset == "omniglot":
        private, public = write_omniglot(args.out / "data")
    elif args.idx_folder is None:
        sys.exit("error: --dataset fashion-mnist needs --idx-folder (apt-get install dataset-fashion-mnist).")
    else:
        private, public = write_fashion(args.idx_folder, args.out / "data")
    t0 = time.perf_counter()
    for seed in ([] if args.report else args.only if args.only is not None else range(args.seeds)):
        prior, evaluators = shared_tools(st, private, public, args.out, log)
        files = train_seed(st, private, public, args.out, seed, log)
        surrogates = surrogates_for(st, public, files, log)
        audit_seed(st, private, prior, evaluators, files, surrogates, args.out, seed, log)
        write_results(args, st, time.perf_counter() - t0, run_done=False)
        log(f"seed {seed} done")
    print(write_results(args, st, time.perf_counter() - t0, run_done=not args.report))


def write_results(args, st: Setting, seconds: float, run_done: bool) -> str:
    """OUT/study.json and OUT/study.md from every seed whose audit finished (whichever process ran
    it); with `run_done` this run's command, time and machine join the list of runs."""
    import os

    import torch

    import mishield

    per_seed = []
    for seed in range(args.seeds):
        report = args.out / f"seed{seed}" / "audit" / "report.json"
        if report.exists():
            per_seed.append(seed_rows(json.loads(report.read_text()), seed))
    path = args.out / "study.json"
    runs = list(json.loads(path.read_text()).get("runs") or []) if path.exists() else []
    if run_done:
        runs.append({"command": " ".join(["python", "bench/privacy_tradeoff.py", *sys.argv[1:]]), "seconds": round(seconds),
                     "hardware": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads",
                     "load_average": os.getloadavg()[0], "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
    doc = {"dataset": st.name, "setting": dataclasses.asdict(st), "defences": DEFENCES, "attacks": ATTACKS,
           "seeds_asked": args.seeds, "per_seed": per_seed, "summary": summarise(per_seed), "runs": runs,
           "software": f"Python {platform.python_version()}, torch {torch.__version__}, mishield {mishield.__version__}"}
    text = markdown(doc)
    for name, content in (("study.json", json.dumps(doc, indent=1)), ("study.md", text)):
        tmp = args.out / f".{name}.tmp{os.getpid()}"
        tmp.write_text(content)
        tmp.replace(args.out / name)
    return text


if __name__ == "__main__":
    main()
