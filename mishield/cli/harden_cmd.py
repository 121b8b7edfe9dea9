"""`mishield harden MODEL --method rolss|ssf --out FILE`: rewrite the last stage's skips."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mishield.cli import console
from mishield.cli.options import (
    ArchOpt, InputSizeOpt, JsonOpt, ModelArg, NumClassesOpt, OverwriteOpt, SitesOpt, StageOpt, TrustOpt,
)


def harden(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", help="Where to write the hardened model file.")],
    method: Annotated[str, typer.Option("--method", help="rolss (remove skips) or ssf (scale skips by --alpha).")] = "rolss",
    alpha: Annotated[
        Optional[float],
        typer.Option("--alpha", min=0.0, max=1.0, help="SSF scale k (default 0.2 additive, 0.01 concatenative)."),
    ] = None,
    epochs: Annotated[int, typer.Option("--epochs", min=0, help="Fine-tuning epochs after surgery.")] = 0,
    stage: StageOpt = None,
    sites: SitesOpt = None,
    arch: ArchOpt = None,
    num_classes: NumClassesOpt = None,
    trust_checkpoint: TrustOpt = False,
    input_size: InputSizeOpt = None,
    overwrite: OverwriteOpt = False,
    json_output: JsonOpt = False,
) -> None:
    """Rewrite the model's last-stage skip connections (RoLSS / SSF) and write a hardened model file."""
    from mishield.errors import BadInputError, UsageError
    from mishield.fileio import check_writable
    from mishield.loading import load_model
    from mishield.modelfile import save_model
    from mishield.surgery import apply_plan, plan_surgery

    if method not in ("rolss", "ssf"):
        raise UsageError(f"--method must be rolss or ssf, not {method!r}.")
    if alpha is not None and method == "rolss":
        raise UsageError("--alpha applies to --method ssf only (rolss is ssf with k = 0).")
    if epochs > 0:
        raise UsageError("fine-tuning is not available yet; run with --epochs 0 for surgery only.")
    check_writable(out, overwrite)
    loaded = load_model(model, arch=arch, num_classes=num_classes, trust_checkpoint=trust_checkpoint,
                        input_size=input_size)
    if not loaded.supports_surgery:
        raise BadInputError(
            f"{model} is a {loaded.kind} archive, which cannot be rewritten; harden the original checkpoint."
        )
    plan = plan_surgery(loaded.model, method, alpha=alpha, stage=stage, sites=sites,
                        input_size=loaded.preprocessing.input_size)
    result = apply_plan(loaded.model, plan)
    previous = list((loaded.recipe or {}).get("surgery") or [])
    save_model(
        out, result.model, arch=loaded.arch, num_classes=loaded.num_classes,
        surgery=previous + [result.spec], preprocessing=loaded.preprocessing,
        source=loaded.source, overwrite=overwrite,
    )
    summary = {
        "out": str(out),
        "method": method,
        "alpha": plan.alpha,
        "selection": plan.selection,
        "sites": plan.selected,
        "dropped_parameters": result.dropped_parameters,
        "surgery_seconds": round(result.seconds, 3),
    }
    if json_output:
        console.emit_json(summary)
        return
    console.err.print(
        f"{method} on {plan.selection}: {len(plan.selected)} skip site(s) rewritten"
        + (f", alpha={plan.alpha}" if method == "ssf" else "")
        + (f", {len(result.dropped_parameters)} dead tensor(s) dropped" if result.dropped_parameters else "")
        + f" in {result.seconds:.2f}s -> [bold]{out}[/]"
    )
