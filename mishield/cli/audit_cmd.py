"""`mishield audit MODEL [MODEL ...]`: a PPA-style inversion attack and a privacy report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mishield.cli import console
from mishield.cli.options import (
    LOAD_PARAMETERS,
    MAX_BATCH_SIZE,
    ArchOpt,
    InputSizeOpt,
    JsonOpt,
    MeanOpt,
    NumClassesOpt,
    OverwriteOpt,
    StdOpt,
    TrustOpt,
    flags_in_errors,
    parse_floats,
)

NO_EVAL_MODEL = (
    "the audit needs an evaluation model trained on the private data with a different architecture; "
    "train one with `mishield train-eval --data PRIVATE_DIR --out eval.safetensors` and pass --eval-model eval.safetensors."
)
NO_PRIOR = (
    "the audit needs an image prior; train mishield's with `mishield prior train --data PUBLIC_DIR --out prior.safetensors` "
    "and pass --prior prior.safetensors, pass a generator as package.module:factory, or --prior none for the generator-free mode."
)


def audit(
    models: Annotated[list[str], typer.Argument(metavar="MODEL", help="Models to audit (files or arch specs); the first is the baseline for Δ.", show_default=False)],
    data: Annotated[Path, typer.Option("--data", help="Private data: ImageFolder (train/ and val/ sub-folders, or one folder per class).")],
    out: Annotated[Path, typer.Option("--out", help="Report directory (report.json, report.html, grids/).")] = Path("mishield-audit"),
    prior: Annotated[str | None, typer.Option("--prior", help="FILE (mishield prior, StyleGAN2-ADA .pkl, TorchScript), package.module:factory, or none.")] = None,
    eval_model: Annotated[list[str] | None, typer.Option("--eval-model", metavar="FILE", help="Evaluation model trained on the private data (see `mishield train-eval`); repeat it with other architectures and the worst case counts.")] = None,
    attacks: Annotated[str | None, typer.Option("--attack", metavar="NAMES", help="Comma-separated: ppa, lomma (adaptive, through surrogates), blackbox (gradient-free, scores), blackbox-labels, transfer (surrogates alone). Default: ppa,blackbox, plus lomma,transfer when --surrogate covers every model. Each model is judged by its worst case.", show_default=False)] = None,
    blackbox_generations: Annotated[int | None, typer.Option("--blackbox-generations", min=0, help="Generations of the black-box attack's search (default: half of -I; 8 target queries per candidate each).")] = None,
    surrogate: Annotated[list[Path] | None, typer.Option("--surrogate", metavar="FILE", help="Surrogate model file (mishield surrogate train) for the lomma attack; repeat it, each is matched to the model it was distilled from.")] = None,
    classes: Annotated[str | None, typer.Option("--classes", help="Target classes, e.g. 0-9,17 (default: all).")] = None,
    preset: Annotated[str, typer.Option("--preset", help="default (calibrated), ci, ppa-facescrub, ppa-celeba or koh2024-facescrub; docs/audit.md lists their numbers.")] = "default",
    samples: Annotated[int | None, typer.Option("--samples", "-S", min=1, help="Initial-selection pool size S.")] = None,
    candidates: Annotated[int | None, typer.Option("--candidates", "-C", min=1, help="Candidates optimised per class C.")] = None,
    iterations: Annotated[int | None, typer.Option("--iterations", "-I", min=0, help="Optimisation steps I (default: the prior's; 0: selection only).")] = None,
    keep: Annotated[int | None, typer.Option("--keep", "-K", min=1, help="Reconstructions kept per class K.")] = None,
    final_augmentations: Annotated[int | None, typer.Option("--final-augmentations", "-A", min=1, help="Augmentations scoring each candidate at final selection A.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, max=MAX_BATCH_SIZE, help="Images per attack step (default 256).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the pool and of every crop.")] = 0,
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="Repeat the attack with seeds SEED, SEED+1, ... and pool them per class before the intervals.")] = 1,
    val_fraction: Annotated[float | None, typer.Option("--val-fraction", help="Hold out this seeded fraction of --data for natural accuracy when it has no val/ folder (default 0.1).")] = None,
    lr: Annotated[float | None, typer.Option("--lr", min=0.0, help="Adam learning rate (default: the prior's, 0.05 for a DCGAN or --prior none, 0.005 for StyleGAN).")] = None,
    milestones: Annotated[str | None, typer.Option("--milestones", help="lr cuts: fractions of the run (0.6,0.8) or steps (30,40); 'none' for no schedule.")] = None,
    gamma: Annotated[float | None, typer.Option("--gamma", min=0.0, help="Factor of each lr cut (default 0.1).")] = None,
    center_crop: Annotated[float | None, typer.Option("--center-crop", min=0.0, max=1.0, help="Keep this central fraction of each prior image side (default: 800/1024 for StyleGAN >= 512 px, else 1).")] = None,
    selection_baseline: Annotated[bool, typer.Option("--selection-baseline/--no-selection-baseline", help="Also report the selection-only (I = 0) baseline.")] = True,
    allow_weak_budget: Annotated[bool, typer.Option("--allow-weak-budget", help="Gate even below the minimum attack budget; the report flags the audit weak.")] = False,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    compile_: Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile the attack step (pays off on long GPU runs).")] = False,
    max_attack_acc: Annotated[float | None, typer.Option("--max-attack-acc", help="Privacy gate: exit 4 unless every model's audit is conclusive and the upper end of its attack accuracy @1 interval is at or below this fraction.")] = None,
    allow_weak_evaluator: Annotated[bool, typer.Option("--allow-weak-evaluator", help="Smoke tests only: let an evaluation model below the accuracy floor through with a warning (never with --max-attack-acc).")] = False,
    arch: ArchOpt = None,
    eval_arch: Annotated[str | None, typer.Option("--eval-arch", help="Architecture of the evaluation model file, where the file records none or a factory.")] = None,
    num_classes: NumClassesOpt = None,
    trust_checkpoint: TrustOpt = False,
    input_size: InputSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    overwrite: OverwriteOpt = False,
    json_output: JsonOpt = False,
    junit: Annotated[Path | None, typer.Option("--junit", metavar="FILE", help="Also write the gate's result as a JUnit XML test report: one test case per model and attack, failing with the verdict's reason when leaky or inconclusive.")] = None,
) -> None:
    """Attack each model with a Plug-and-Play-style inversion and report how much private data it gives away."""
    from mishield.audit.runner import audit as run
    from mishield.cli.progress import progress_bars
    from mishield.errors import PrivacyGateError, UsageError
    from mishield.launch import torchrun_launch

    if not eval_model:
        raise UsageError(NO_EVAL_MODEL)
    if prior is None:
        raise UsageError(NO_PRIOR)
    options = {name: value for name, value in locals().items() if name in CONFIG_OPTIONS}
    provenance = {"preset": preset, "prior": prior, "eval_model": eval_model[0], "eval_models": list(eval_model),
                  "surrogates": [str(f) for f in surrogate or ()], "data": str(data), "models": list(models)}
    inputs = [*models, data, prior, *eval_model, *(surrogate or ())]
    with _junit_claimed(junit, overwrite, inputs), flags_in_errors(run, extra=(*LOAD_PARAMETERS, *CONFIG_OPTIONS)), \
            progress_bars(torchrun_launch().is_main) as progress:
        config = audit_config(options, provenance)
        report = run(models, data=data, prior=prior, eval_model=eval_model, config=config, surrogates=list(surrogate or ()),
                     out=out, progress=progress)  # fmt: skip
        if report is not None and junit is not None:  # before the gate's exit 4: CI reads it most then
            from mishield.audit.junit import write_junit

            write_junit(report, junit, overwrite)
    if report is None:  # another rank under torchrun; rank 0 prints
        return
    _print(report, json_output, junit)
    if not report.passed:
        raise PrivacyGateError(gate_message(report, out / "report.html"))


def _junit_claimed(junit: Path | None, overwrite: bool, inputs: list):
    """--junit FILE checked against the inputs and locked before the audit (`mishield.fileio.claim_output`)."""
    import contextlib

    from mishield.fileio import claim_output

    return contextlib.nullcontext() if junit is None else claim_output(junit, overwrite, inputs)


# The options of `mishield audit` that make its AuditConfig (the parameter names of `audit` above).
CONFIG_OPTIONS = ("attacks", "blackbox_generations", "classes", "preset", "samples", "candidates", "iterations", "keep", "final_augmentations",
                  "batch_size", "seed", "seeds", "val_fraction", "lr", "milestones", "gamma", "center_crop",
                  "selection_baseline", "allow_weak_budget", "device", "compile_", "max_attack_acc", "allow_weak_evaluator",
                  "arch", "eval_arch", "num_classes", "trust_checkpoint", "input_size", "mean", "std", "overwrite")  # fmt: skip


def audit_config(options: dict, provenance: dict | None = None):
    """The one mapping from `mishield audit`'s options (CONFIG_OPTIONS, by parameter name) to its AuditConfig."""
    from mishield.attack.config import BlackBoxConfig
    from mishield.audit.config import AuditConfig

    o = options
    load = {"arch": o["arch"], "num_classes": o["num_classes"], "input_size": o["input_size"],
            "mean": parse_floats(o["mean"], "--mean"), "std": parse_floats(o["std"], "--std")}
    return AuditConfig.preset(
        o["preset"], samples=o["samples"], candidates=o["candidates"], iterations=o["iterations"], keep=o["keep"],
        final_augmentations=o["final_augmentations"], batch_size=o["batch_size"], seed=o["seed"], lr=o["lr"],
        milestones=_milestones(o["milestones"]), gamma=o["gamma"], center_crop=o["center_crop"], compile=o["compile_"],
        selection_baseline=o["selection_baseline"], attacks=o["attacks"], classes=o["classes"], seeds=o["seeds"],
        max_attack_acc=o["max_attack_acc"], allow_weak_evaluator=o["allow_weak_evaluator"],
        allow_weak_budget=o["allow_weak_budget"], val_fraction=o["val_fraction"], device=o["device"],
        overwrite=o["overwrite"], trust_checkpoint=o["trust_checkpoint"], load_options=load, eval_arch=o["eval_arch"],
        provenance=provenance, blackbox=BlackBoxConfig(generations=o["blackbox_generations"]),
    )  # fmt: skip


def _milestones(text: str | None) -> tuple[float, ...] | None:
    from mishield.errors import UsageError

    if text is None:
        return None
    if text.strip().lower() == "none":
        return ()
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"--milestones takes numbers like 0.6,0.8 or 30,40, or none; cannot read {text!r}.") from None


def _print(report, json_output: bool, junit: Path | None = None) -> None:
    from mishield.audit.report import summary_table

    if json_output:
        console.emit_json(report.to_dict())
        return
    from rich.text import Text

    from mishield.audit.runner import audit as run
    from mishield.cli.options import flag_names, flags_in_text

    console.err.print(summary_table(report))
    names = flag_names(run, extra=(*LOAD_PARAMETERS, *CONFIG_OPTIONS))  # report.json keeps the library's words
    for warning in report.warnings:
        console.err.print("[yellow]warning:[/]", Text(flags_in_text(warning, names)), soft_wrap=True)
    console.err.print(f"report: [bold]{report.files['html']}[/]" + (f" (JUnit: {junit})" if junit is not None else ""))


def gate_message(report, html: Path) -> str:
    """One sentence on why the gate failed: inconclusive audits first (they are not evidence of
    privacy), then the models whose interval's upper end exceeds the threshold; the advice follows
    the causes the audit found (mishield.audit.stats.VERDICT_CAUSES), not a fixed remedy."""
    from mishield.audit.stats import VERDICT_CAUSES

    gate = report.gate
    inconclusive = [n for n in gate.failing if n in gate.inconclusive]
    leaky = [n for n in gate.failing if n not in gate.inconclusive]
    parts = []
    if inconclusive:
        why = "; ".join(f"{n}: {gate.reasons.get(n, 'see the report').rstrip('.')}" for n in inconclusive)
        parts.append(f"the audit is inconclusive, which never passes the gate ({why})")
    if leaky:
        parts.append(f"the upper end of the attack accuracy @1 interval of {', '.join(leaky)} exceeds --max-attack-acc {gate.max_attack_acc}")
    causes = [(m.verdict or {}).get("cause") for m in report.models if m.name in gate.failing]
    advice = list(dict.fromkeys(VERDICT_CAUSES[c] for c in causes if c in VERDICT_CAUSES))
    if "unreached" in causes and any("prior looks too weak" in w for w in report.warnings):
        advice.append("the report also finds the prior too weak: train it longer or on closer public data")
    return f"{'; '.join(parts)}; {'; '.join(advice) or 'see the report'}; review {html}."
