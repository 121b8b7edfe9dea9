"""`mishield harden MODEL --data DIR --public DIR --search --max-acc-drop 0.02 --out FILE`: the
privacy/utility search of `mishield.search_defences`, its options, and what it prints.

The search's candidates take every training option of `harden` (schedule, lr, batch size, BiDO,
seed, device, ...) from the same flags; the grid chooses the surgery and the loss / data
defences, so the flags that set those are refused with --search rather than silently replaced.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mishield.cli import console

SEARCH_PANEL = "Defence search (--search; needs --data)"
# Flags that name what the grid chooses, or that the search manages itself.
NOT_WITH_SEARCH = ("method", "alpha", "neg_ls", "neg_ls_start", "neg_ls_ramp", "erase", "freeze_stages", "public_epochs",
                   "resume", "reset_head", "val_data")
# The search's own options, by the name its library errors use (`max_acc_drop` -> --max-acc-drop).
SEARCH_FLAGS = ("max_acc_drop", "search_epochs", "grid", "search_preset", "prior", "eval_model", "eval_arch",
                "allow_weak_evaluator", "remeasure")


SearchOpt = Annotated[bool, typer.Option("--search", rich_help_panel=SEARCH_PANEL,
                                         help="Try a grid of stacked defences on short fine-tunings, audit them all in one "
                                              "audit, pick the least leaky within --max-acc-drop and fine-tune it fully "
                                              "into --out; writes OUT.search.json and OUT.search.svg (docs/search.md).")]
MaxAccDropOpt = Annotated[float, typer.Option("--max-acc-drop", min=0.0, max=1.0, rich_help_panel=SEARCH_PANEL,
                                              help="Natural-accuracy budget: at most this fraction below the original's "
                                                   "(0.02 = 2 points), by the point estimates on the same held-out images.")]
SearchEpochsOpt = Annotated[int, typer.Option("--search-epochs", min=1, rich_help_panel=SEARCH_PANEL,
                                              help="Each candidate's short fine-tuning; the pick then gets --epochs.")]
GridOpt = Annotated[str, typer.Option("--grid", rich_help_panel=SEARCH_PANEL,
                                      help="default (RoLSS, SSF 0.2, SSF 0.5, each alone / + negative LS / + erasing / + both: "
                                           "12) or quick (RoLSS and SSF 0.2, alone and + both: 4).")]
SearchPresetOpt = Annotated[str, typer.Option("--search-preset", rich_help_panel=SEARCH_PANEL,
                                              help="Attack budget of the search's audit (a `mishield audit --preset` name).")]
PriorOpt = Annotated[str | None, typer.Option("--prior", show_default=False, rich_help_panel=SEARCH_PANEL,
                                              help="The audit's image prior file, or none (generator-free); default: a "
                                                   "DCGAN trained on --public.")]
EvalModelOpt = Annotated[list[str] | None, typer.Option("--eval-model", show_default=False, rich_help_panel=SEARCH_PANEL,
                                                        help="Evaluation model file (repeatable); default: one trained on --data.")]
EvalArchOpt = Annotated[str | None, typer.Option("--eval-arch", show_default=False, rich_help_panel=SEARCH_PANEL,
                                                 help="Architecture of --eval-model where its file records none (or to confirm a "
                                                      "package.module:factory it records).")]
AllowWeakEvaluatorOpt = Annotated[bool, typer.Option("--allow-weak-evaluator", rich_help_panel=SEARCH_PANEL,
                                                     help="Smoke tests only: let an evaluation model below the accuracy "
                                                          "floor through with a warning.")]
RemeasureOpt = Annotated[bool, typer.Option("--remeasure/--no-remeasure", rich_help_panel=SEARCH_PANEL,
                                            help="Audit the fully fine-tuned pick again against the original.")]


def refuse_search_options(ctx: typer.Context, search: bool) -> None:
    """Search options without --search, or flags the grid chooses with it, are usage errors."""
    from mishield.cli.options import flag_for
    from mishield.errors import UsageError

    def given(name: str) -> bool:
        return getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"

    if not search:
        stray = [n for n in SEARCH_FLAGS if given(n)]
        if stray:
            raise UsageError(f"{flag_for(stray[0])} is an option of the defence search; add --search or leave it out.")
        return
    chosen = [n for n in NOT_WITH_SEARCH if given(n)]
    if chosen:
        raise UsageError(f"{flag_for(chosen[0])} cannot be combined with --search: the search's grid chooses the surgery and "
                         "the defences (--grid), continues an interrupted run itself and measures on DATA's own split.")


def run_search(model: str, out: Path, base: dict, load: dict, data: Path | None, public: Path | None, search: dict,
               json_output: bool, recipe_keys: set[str], flags: tuple[str, ...]) -> None:
    """Build the SearchConfig, run `mishield.search_defences` and print what it found. `base` holds
    harden's options, `search` the search's, `recipe_keys` what a --recipe file set, `flags` the
    names library errors may use for harden's flags."""
    from mishield.audit.config import AuditConfig
    from mishield.cli.options import LOAD_PARAMETERS, flags_in_errors
    from mishield.cli.progress import progress_bars
    from mishield.errors import PrivacyGateError, UsageError
    from mishield.hardening import HardenConfig
    from mishield.hardening import harden as harden_model
    from mishield.search import SearchConfig
    from mishield.search.runner import search_defences

    recipe_chosen = sorted(recipe_keys & {"method", *NOT_WITH_SEARCH})
    with flags_in_errors(search_defences, harden_model, extra=(*LOAD_PARAMETERS, *flags, *SEARCH_FLAGS)):
        if recipe_chosen:
            raise UsageError(f"the --recipe file sets {recipe_chosen[0]}, which the search's grid chooses; use a recipe without it.")
        if data is None:
            raise UsageError("the search fine-tunes and audits on your private images; pass `data`.")
        overwrite = base.pop("overwrite")
        harden_base = HardenConfig(**{k: v for k, v in base.items() if k not in ("method", *NOT_WITH_SEARCH)})
        audit = AuditConfig.preset(search["search_preset"], device=harden_base.device, seed=harden_base.seed,
                                   allow_weak_evaluator=search["allow_weak_evaluator"], eval_arch=search["eval_arch"])
        config = SearchConfig(base=harden_base, grid=search["grid"], search_epochs=search["search_epochs"],
                              max_acc_drop=search["max_acc_drop"], audit=audit, remeasure=search["remeasure"],
                              load_options=load, overwrite=overwrite)
        with progress_bars(True) as bars:
            result = search_defences(model, data=data, public=public, prior=search["prior"], eval_model=search["eval_model"],
                                     out=out, config=config, progress=bars, log=_printer())
    doc = result.to_dict()
    if json_output:
        console.emit_json(doc)
    else:
        _print_search(doc)
    if result.pick is None:
        raise PrivacyGateError(f"no candidate kept natural accuracy within --max-acc-drop {config.max_acc_drop}, so no model "
                               f"was written; {doc['files']['json']} lists what each one measured.")


def _printer():
    def say(line: str) -> None:
        console.err.print(line, markup=False, highlight=False, soft_wrap=True)

    return say


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _ci(pair) -> str:
    return "-" if not pair or None in pair else f"[{100 * pair[0]:.1f}, {100 * pair[1]:.1f}]"


def _print_search(doc: dict) -> None:
    from rich.table import Table

    table = Table(title=f"defence search: {len(doc['candidates'])} candidates against {doc['baseline']['name']}",
                  title_justify="left", caption="attack accuracy: worst case over attacks and evaluators, 95 % intervals; "
                  "paired: candidate minus original", caption_justify="left")
    for col in ("model", "nat. acc %", "drop pts", "budget", "attack acc %", "95 % interval", "paired pts", "95 % interval ",
                "train s"):
        table.add_column(col, justify="left" if col in ("model", "budget") else "right")
    b = doc["baseline"]
    table.add_row("original", _pct(b["natural_acc"]), "", "", _pct(b["attack_acc1"]), _ci(b["attack_acc1_ci95"]), "", "", "")
    for c in doc["candidates"]:
        name = c["name"] + (" (pick)" if c["name"] == doc["pick"] else "")
        diff = None if c["paired_diff_acc1"] is None else f"{100 * c['paired_diff_acc1']:+.1f}"
        table.add_row(name, _pct(c["natural_acc"]), _pct(c["accuracy_drop"]), "within" if c["within_budget"] else "outside",
                      _pct(c["attack_acc1"]), _ci(c["attack_acc1_ci95"]), diff or "-", _ci(c["paired_diff_acc1_ci95"]),
                      "-" if c["train_seconds"] is None else f"{c['train_seconds']:.0f}")
    console.err.print(table)
    for line in doc["statements"]:
        console.err.print("* " + line, markup=False, highlight=False, soft_wrap=True)
    files = doc["files"]
    console.err.print(f"-> {doc['out'] or '(no model written)'}; {files['json']}; {files['svg']} ({doc['seconds']:.0f} s)",
                      markup=False, highlight=False)
