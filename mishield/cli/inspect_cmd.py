"""`mishield inspect MODEL`: every skip site, its stage, and what each method would change."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mishield.cli import console
from mishield.cli.options import (
    ArchOpt,
    InputSizeOpt,
    JsonOpt,
    MeanOpt,
    ModelArg,
    NumClassesOpt,
    SitesOpt,
    StageOpt,
    StdOpt,
    TrustOpt,
    flags_in_errors,
    parse_floats,
)


def inspect(
    model: ModelArg,
    arch: ArchOpt = None,
    num_classes: NumClassesOpt = None,
    trust_checkpoint: TrustOpt = False,
    input_size: InputSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    stage: StageOpt = None,
    sites: SitesOpt = None,
    data: Annotated[Path | None, typer.Option("--data", help="Your images (ImageFolder): a file that records no input size is inspected at the size harden and audit would use for them.")] = None,
    json_output: JsonOpt = False,
) -> None:
    """List the model's skip connections and mark the ones RoLSS / SSF would change."""
    from mishield.inspection import inspect_model

    with flags_in_errors(inspect_model):
        load = {"arch": arch, "num_classes": num_classes, "trust_checkpoint": trust_checkpoint, "input_size": input_size,
                "mean": parse_floats(mean, "--mean"), "std": parse_floats(std, "--std")}
        found = inspect_model(model, stage=stage, sites=sites, data=data, load_options=load)
    if json_output:
        console.emit_json(found.to_dict())
        return
    _print(found)


def _print(found) -> None:
    loaded, plan, analysis = found.loaded, found.plan, found.analysis
    out = console.out  # the result, so `mishield inspect m.pt > sites.txt` captures it
    out.print(f"[bold]{found.model}[/]  arch={loaded.arch or '?'}  classes={loaded.num_classes}  "
              f"parameters={found.parameters:,}  input={'x'.join(map(str, loaded.preprocessing.input_size))}")
    table = Table(title="skip connections", title_justify="left")
    for col in ("site", "kind", "shortcut", "stage", "resolution", "output", "changed"):
        table.add_column(col, no_wrap=col == "site")
    for s in analysis.sites:
        chosen = s.name in plan.selected
        relative = [m.removeprefix(s.block + ".") for m in s.shortcut_modules]
        shortcut = s.shortcut + (f": {', '.join(relative)}" if relative else "")
        if s.kind == "concat":
            shortcut = f"{s.skip_inputs} older map(s)"
        table.add_row(s.name, s.kind, shortcut, str(s.stage), s.resolution,
                      "x".join(map(str, s.output_shape)), "[bold]yes[/]" if chosen else "")
    out.print(table)
    stages = Table(title="stages (grouped by output resolution" + (", isotropic: blocks split in 4)" if analysis.isotropic else ")"),
                   title_justify="left")
    for col in ("stage", "resolution", "module", "sites"):
        stages.add_column(col)
    for st in analysis.stages:
        stages.add_row(str(st.index), st.resolution, st.module or "(root)", str(len(st.sites)))
    out.print(stages)
    out.print(f"methods change [bold]{plan.selection}[/]: {len(plan.selected)} site(s); "
              f"rolss drops {len(found.rolss_drops_modules)} projection module(s), {found.rolss_drops_parameters:,} parameters.")
    if found.input_size_source == "default":
        size = loaded.preprocessing.input_size[1]
        out.print(f"note: {found.model} records no input size, so this assumes the architecture's default {size} px; "
                  "pass --data (your images) or --input-size to see the stages at the size you train on.")
    if analysis.skipless_tail:
        out.print(f"note: module stage(s) {', '.join(analysis.skipless_tail)} come after the last skip stage and "
                  "have no skip connection; the methods use the last resolution stage that has skips.")
