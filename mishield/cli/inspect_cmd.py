"""`mishield inspect MODEL`: every skip site, its stage, and what each method would change."""

from __future__ import annotations

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
    json_output: JsonOpt = False,
) -> None:
    """List the model's skip connections and mark the ones RoLSS / SSF would change."""
    from mishield.errors import BadInputError
    from mishield.models import load_model
    from mishield.surgery import plan_surgery

    loaded = load_model(model, arch=arch, num_classes=num_classes, trust_checkpoint=trust_checkpoint,
                        input_size=input_size, mean=parse_floats(mean, "--mean"), std=parse_floats(std, "--std"))
    if not loaded.supports_surgery:
        raise BadInputError(
            f"{model} is a {loaded.kind} archive, which cannot be traced for surgery; inspect the original "
            "checkpoint instead (audit and export accept it as it is)."
        )
    plan = plan_surgery(loaded.model, "rolss", stage=stage, sites=sites,
                        input_size=loaded.preprocessing.input_size)
    analysis = plan.analysis
    params = sum(p.numel() for p in loaded.model.parameters())
    dropped = {m for name in plan.selected for m in analysis.site(name).shortcut_modules}
    dropped_params = sum(
        p.numel() for path in dropped for p in loaded.model.get_submodule(path).parameters()
    )
    if json_output:
        console.emit_json({
            "model": str(model),
            "arch": loaded.arch,
            "num_classes": loaded.num_classes,
            "parameters": params,
            "preprocessing": loaded.preprocessing.to_dict(),
            "selection": plan.selection,
            "selected": plan.selected,
            "rolss_drops_modules": sorted(dropped),
            "rolss_drops_parameters": dropped_params,
            **analysis.to_dict(),
        })
        return

    out = console.out  # the result, so `mishield inspect m.pt > sites.txt` captures it
    out.print(f"[bold]{model}[/]  arch={loaded.arch or '?'}  classes={loaded.num_classes}  "
              f"parameters={params:,}  input={'x'.join(map(str, loaded.preprocessing.input_size))}")
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
              f"rolss drops {len(dropped)} projection module(s), {dropped_params:,} parameters.")
    if analysis.skipless_tail:
        out.print(f"note: module stage(s) {', '.join(analysis.skipless_tail)} come after the last skip stage and "
                  "have no skip connection; the methods use the last resolution stage that has skips.")
