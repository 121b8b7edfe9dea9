"""Attack accuracy against the attack's budget (steps, lr, Adam betas) on the embedded Fashion-MNIST.

    python bench/audit_calibration.py      # default grid, CPU: ~10 min with cached models, ~15 from scratch (2 shared cores)
    python bench/audit_calibration.py --classes 5 --candidates 16 --keep 8 --steps 0,10,30,100,300

The setting of the audit tests at 32 px: private classes 0-4 (the target's), the prior a DCGAN
trained on classes 5-9 (which the target never saw), the evaluator a skip-free CNN trained on
the private classes. Three targets are attacked with the same pool and crops:

* untrained: a randomly initialised tiny ResNet (its interval should cover chance);
* trained:   the same architecture trained on the private classes;
* rolss:     a copy of `trained` with RoLSS applied to its last stage, fine-tuned briefly.

Each (lr, betas) setting runs ONE optimisation to the largest step count and snapshots the
latents at every smaller count: Adam's update does not depend on the total budget, so a snapshot
at step 10 is exactly a 10-step attack. Step 0 is the selection-only baseline (initial and
final selection, no optimisation). For each point the script reports top-K attack accuracy @1
with its class-bootstrap interval, the unfiltered accuracy over all C optimised candidates, the
target's mean confidence on the kept images, the verdict, and for `rolss` the paired difference
to `trained`. Models and the prior are trained once and cached in --out.

Writes <out>/audit_calibration.json and <out>/audit_calibration.md (hardware, torch version,
wall time) and prints the markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # attack_support: the tests' tiny ResNet and evaluator CNN

from mishield.attack.augment import candidate_keys
from mishield.attack.config import AttackConfig
from mishield.attack.engine import InversionAttack, select_top, to_uint8
from mishield.attack.priors import load_prior
from mishield.audit.evaluator import Evaluator
from mishield.audit.metrics import topk_hits
from mishield.audit.stats import (
    chance_level,
    class_bootstrap,
    paired_difference,
    verdict,
)
from mishield.data import load_image_folders, materialize_fashion_mnist
from mishield.fileio import atomic_output
from mishield.models import load_model, save_model
from mishield.preprocessing import Preprocessing
from mishield.runtime import Runtime
from mishield.surgery import apply_plan, plan_surgery
from mishield.training import RunOptions, TrainingRecipe, evaluate_accuracy, fit
from mishield.training.evaluator import EvalModelConfig, train_eval_model
from mishield.training.prior import PriorTrainingConfig, train_prior

TARGET_ARCH = "attack_support:tiny_resnet"
EVAL_ARCH = "attack_support:small_plain_cnn"
PRE = Preprocessing((3, 32, 32), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
PPA_BETAS, ADAM_BETAS = (0.1, 0.1), (0.9, 0.999)
CHANCE = chance_level(5)  # the target has 5 classes, whichever of them are attacked


def _csv(kind):
    return lambda s: [kind(x) for x in s.split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("out/audit_calibration"), help="cache of data, prior, models; results")
    p.add_argument("--classes", type=int, default=3, help="private classes attacked (of the target's 5)")
    p.add_argument("--samples", type=int, default=200, help="S: initial-selection pool")
    p.add_argument("--candidates", type=int, default=8, help="C: optimised per class")
    p.add_argument("--keep", type=int, default=4, help="K: kept per class")
    p.add_argument("--final-augmentations", type=int, default=8, help="A")
    p.add_argument("--steps", type=_csv(int), default=[0, 10, 30, 100, 300])
    p.add_argument("--lrs", type=_csv(float), default=[0.005, 0.02, 0.05, 0.1])
    p.add_argument("--milestones", type=_csv(float), default=[], help="lr cuts x0.1 (fractions of the largest step count, or steps); "
                   "with cuts a snapshot at a smaller count is no longer that shorter attack (default: none)")
    p.add_argument("--betas", type=_csv(str), default=["ppa", "adam"], help="ppa = (0.1, 0.1), adam = (0.9, 0.999)")
    p.add_argument("--targets", type=_csv(str), default=["untrained", "trained", "rolss"])
    p.add_argument("--target-epochs", type=int, default=4)
    p.add_argument("--prior-epochs", type=int, default=20)
    p.add_argument("--eval-epochs", type=int, default=10, help="4 epochs left the evaluator near 55 %% accuracy")
    p.add_argument("--threads", type=int, default=1, help="1 is steadier on a shared machine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threshold", type=float, default=0.5, help="gate threshold used for the verdict column")
    p.add_argument("--render", type=Path, help="only print the tables of an earlier run's JSON")
    return p.parse_args(argv)


def prepare(out: Path, target_epochs: int, prior_epochs: int, eval_epochs: int) -> dict:
    """Data, prior, targets and evaluator, each built once and cached under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    private, public = out / "private", out / "public"
    if not (private / "train").exists():
        materialize_fashion_mnist(private, classes=range(5))
    if not (public / "train").exists():
        materialize_fashion_mnist(public, classes=range(5, 10))
    prior_path = out / "prior.safetensors"
    if not prior_path.exists():
        cfg = PriorTrainingConfig(resolution=32, latent_dim=64, width=32, epochs=prior_epochs, batch_size=64, lr=3e-4, seed=0)
        train_prior(public, prior_path, cfg)
    splits = load_image_folders(private)
    from attack_support import tiny_resnet

    paths = {name: out / f"{name}.pt" for name in ("untrained", "trained", "rolss")}
    if not paths["trained"].exists():
        torch.manual_seed(0)
        trained = tiny_resnet(5)
        fit(trained, splits, PRE, TrainingRecipe("finetune", epochs=target_epochs, lr=1e-3, batch_size=64), options=RunOptions(device="cpu"))
        save_model(paths["trained"], trained, arch=TARGET_ARCH, num_classes=5, surgery=None, preprocessing=PRE)
    if not paths["untrained"].exists():
        torch.manual_seed(1)
        save_model(paths["untrained"], tiny_resnet(5).eval(), arch=TARGET_ARCH, num_classes=5, surgery=None, preprocessing=PRE)
    if not paths["rolss"].exists():
        # TTS at bench size: the trained model is stage 1, RoLSS on the last stage, then a short stage 2.
        trained = load_model(paths["trained"], arch=TARGET_ARCH).model
        result = apply_plan(trained, plan_surgery(trained, "rolss", input_size=PRE.input_size))
        fit(result.model, splits, PRE, TrainingRecipe("finetune", epochs=max(1, target_epochs // 2), lr=1e-3, batch_size=64),
            options=RunOptions(device="cpu"))
        save_model(paths["rolss"], result.model, arch=TARGET_ARCH, num_classes=5, surgery=result.spec, preprocessing=PRE)
    eval_path = out / "eval.pt"
    if not eval_path.exists():
        train_eval_model(private, eval_path, config=EvalModelConfig(arch=EVAL_ARCH, input_size=32, epochs=eval_epochs, lr=1e-3,
                                                                    batch_size=64, seed=1))
    models = {name: load_model(p, arch=TARGET_ARCH).model.eval() for name, p in paths.items()}
    evaluator = load_model(eval_path, arch=EVAL_ARCH).model.eval()
    return {"splits": splits, "prior": prior_path, "models": models, "evaluator": evaluator}


def natural_accuracy(model, splits) -> float:
    return float(evaluate_accuracy(model, splits.val, PRE, batch_size=256, device="cpu"))


def attack_curve(attack: InversionAttack, pool: torch.Tensor, classes: list[int], steps: list[int], evaluator: Evaluator) -> dict:
    """Optimise once to max(steps), judging a snapshot of the latents at every requested count."""
    cfg, inv = attack.config, attack.step
    labels = torch.tensor(classes).repeat_interleave(cfg.candidates)
    ranks = torch.arange(cfg.candidates).repeat(len(classes))
    keys = candidate_keys(cfg.seed, labels, ranks)
    latents = pool.detach().clone().requires_grad_(True)
    optimizer = inv.make_optimizer(latents)
    out, t0 = {}, time.perf_counter()
    try:
        for step in range(max(steps) + 1):
            if step in steps:
                attack.prior.detach()  # a generator-free prior's BatchNorm hooks belong to the optimisation only
                out[step] = judge(attack, latents.detach(), labels, keys, classes, evaluator)
                out[step]["seconds"] = time.perf_counter() - t0
                attack.prior.attach(attack.target)
            if step == max(steps):
                break
            for group in optimizer.param_groups:  # the config's MultiStep schedule, as InversionStep.run applies it
                group["lr"] = cfg.lr_at(step)
            optimizer.zero_grad(set_to_none=True)
            inv.forward(latents, labels, keys, torch.tensor(step)).backward()
            optimizer.step()
            with torch.no_grad():
                attack.prior.constrain_(latents)  # the prior's latent constraint, as in the audit
    finally:
        attack.prior.detach()
    return out


def judge(attack: InversionAttack, latents, labels, keys, classes: list[int], evaluator: Evaluator) -> dict:
    """PPA's final selection on the current latents, then the evaluator's verdict on kept and all candidates."""
    cfg, n = attack.config, len(classes)
    stats = attack.final_statistics(latents, labels, keys)
    flat, kept_scores = select_top(stats["confidence"], n, cfg.keep, tiebreak=stats["margin"])
    with torch.no_grad():
        images = to_uint8(attack.prior.generate(latents))
    logits, _ = evaluator.images(images)
    every = topk_hits(logits, labels, 1).view(n, cfg.candidates)
    kept = topk_hits(logits[flat], labels[flat], 1).view(n, cfg.keep)
    return {"kept": kept.numpy(), "unfiltered": every.numpy(), "target_conf": kept_scores.numpy(),
            "target_top1": stats["top1"][flat].view(n, cfg.keep).cpu().numpy()}


def run_grid(args, setup: dict, on_rows=None) -> list[dict]:
    """Every (target, betas, lr) curve; `on_rows(rows)` after each, so a cut-short run keeps its rows."""
    runtime = Runtime(torch.device("cpu"))
    classes = list(range(args.classes))
    prior = load_prior(str(setup["prior"]), target_input_size=PRE.input_size)
    evaluator = Evaluator(setup["evaluator"], PRE, runtime, batch_size=256)
    betas = {"ppa": PPA_BETAS, "adam": ADAM_BETAS}
    kept, rows = {}, []
    for name in args.targets:
        for bname in args.betas:
            for lr in args.lrs:
                t0 = time.perf_counter()
                cfg = AttackConfig(samples=args.samples, candidates=args.candidates, iterations=max(args.steps), keep=args.keep,
                                   final_augmentations=args.final_augmentations, batch_size=512, seed=args.seed, lr=lr, betas=betas[bname],
                                   milestones=tuple(args.milestones), gamma=0.1)  # fmt: skip
                attack = InversionAttack(prior, setup["models"][name], PRE, cfg, runtime)
                pool, _ = attack.initial_selection(classes)
                for step, res in attack_curve(attack, pool, classes, args.steps, evaluator).items():
                    kept[(name, bname, lr, step)] = res["kept"]
                    rows.append(summarise(args, name, bname, lr, step, res, kept.get(("trained", bname, lr, step))))
                print(f"[{name} betas={bname} lr={lr}] {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
                if on_rows is not None:
                    on_rows(rows)
    return rows


def summarise(args, name: str, bname: str, lr: float, step: int, res: dict, trained_kept) -> dict:
    iv = class_bootstrap(res["kept"], seed=args.seed)
    row = {
        "target": name, "betas": bname, "lr": lr, "steps": step,
        "attack_acc1": iv.estimate, "interval": [iv.low, iv.high],
        "unfiltered_acc1": float(res["unfiltered"].mean()),
        "target_confidence": float(res["target_conf"].mean()),
        "verdict": verdict(iv, args.threshold, chance=CHANCE, reached=res["target_top1"]).status,
        "seconds": res["seconds"],
    }  # fmt: skip
    if name == "rolss" and trained_kept is not None:
        d = paired_difference(trained_kept, res["kept"], seed=args.seed)
        row["paired_diff_vs_trained"] = {"estimate": d.estimate, "interval": [d.low, d.high], "method": d.method}
    return row


def hardware() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}  # fmt: skip


def markdown(result: dict) -> str:
    """Three pivot tables (rows: target, betas, lr; columns: steps): accuracy, target confidence, paired Δ."""
    hw, rows = result["hardware"], result.get("rows", [])
    steps = sorted({r["steps"] for r in rows})
    cells: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        cells.setdefault((r["target"], r["betas"], r["lr"]), {})[r["steps"]] = r

    def table(title: str, fmt, keys) -> list[str]:
        out = [f"**{title}**", "", "| target | betas | lr | " + " | ".join(f"I={s}" for s in steps) + " |",
               "|---|---|---|" + "---|" * len(steps)]  # fmt: skip
        for key in keys:
            out.append(f"| {key[0]} | {key[1]} | {key[2]:g} | " + " | ".join(fmt(cells[key].get(s)) for s in steps) + " |")
        return [*out, ""]

    def acc(r):
        if r is None:
            return ""
        mark = {"inconclusive": " ?", "leaky": " !"}.get(r["verdict"], "")
        return f"{r['attack_acc1']:.0%} ({r['interval'][0]:.0%}-{r['interval'][1]:.0%}){mark}"

    def diff(r):
        d = r and r.get("paired_diff_vs_trained")
        return f"{d['estimate']:+.0%} ({d['interval'][0]:+.0%} to {d['interval'][1]:+.0%})" if d else ""

    s = result.get("settings", {})
    lines = [
        (
            f"Hardware: {hw['cpu']}, {hw['cores']} cores ({hw['torch_threads']} torch thread(s)), torch {hw['torch']}; "
            f"wall time {result.get('wall_seconds', 0):.0f} s{'' if result.get('complete') else ' (PARTIAL: the run was cut short)'}. "
            f"Natural accuracy {', '.join(f'{k} {v:.1%}' for k, v in result['natural_acc'].items())}; evaluator {result['evaluator_acc']:.1%}; "
            f"chance @1 {result['chance']:.0%}; {len(result['classes'])} classes x K={s.get('keep')} kept of C={s.get('candidates')}, "
            f"S={s.get('samples')}, A={s.get('final_augmentations')}."
        ),
        "",
        f"Command: `{result['command']}`",
        "",
    ]
    keys = list(cells)
    lines += table("Attack accuracy @1 (95 % class-bootstrap interval); ? inconclusive, ! leaky at the --threshold", acc, keys)
    lines += table("Unfiltered accuracy @1 over all C candidates", lambda r: f"{r['unfiltered_acc1']:.0%}" if r else "", keys)
    lines += table("Target's mean confidence on the kept images", lambda r: f"{r['target_confidence']:.2f}" if r else "", keys)
    lines += table("Paired difference rolss - trained (95 % interval)", diff, [k for k in keys if k[0] == "rolss"])
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.render:
        print(markdown(json.loads(args.render.read_text())))
        return
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    setup = prepare(args.out, args.target_epochs, args.prior_epochs, args.eval_epochs)
    natural = {name: natural_accuracy(m, setup["splits"]) for name, m in setup["models"].items()}
    result = {
        "command": "python bench/audit_calibration.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "hardware": hardware(),
        "setup_seconds": time.perf_counter() - t0,
        "natural_acc": natural,
        "evaluator_acc": natural_accuracy(setup["evaluator"], setup["splits"]),
        "chance": CHANCE,
        "classes": list(range(args.classes)),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    print(json.dumps(result), file=sys.stderr, flush=True)

    def write(rows: list[dict], complete: bool = False) -> str:
        result.update(rows=rows, complete=complete, wall_seconds=time.perf_counter() - t0)
        table = markdown(result)
        for name, text in (("audit_calibration.json", json.dumps(result, indent=1)), ("audit_calibration.md", table)):
            with atomic_output(args.out / name, overwrite=True) as tmp:
                tmp.write_text(text)
        return table

    print(write(run_grid(args, setup, write), complete=True))


if __name__ == "__main__":
    main()
