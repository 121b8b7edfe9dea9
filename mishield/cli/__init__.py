"""The `mishield` command line: a thin layer over the library (one file per command).

`main()` turns every MishieldError into one sentence on stderr and its exit code
(DESIGN.md §6); with MISHIELD_DEBUG=1 the traceback is shown instead.
"""

from __future__ import annotations

import os
import sys

import typer

from mishield.errors import MishieldError

app = typer.Typer(
    name="mishield",
    help="Harden image classifiers against model-inversion attacks, and audit how much they leak.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _register() -> None:
    # Imported here so `mishield --help` stays cheap to reach and import errors surface in main().
    if app.registered_commands:  # main() runs many times in one process under the tests
        return
    from mishield.cli import export_cmd, harden_cmd, inspect_cmd

    app.command("inspect")(inspect_cmd.inspect)
    app.command("harden")(harden_cmd.harden)
    app.command("export")(export_cmd.export)

    from mishield.cli import audit_cmd, prior_cmd, train_eval_cmd
    app.command("audit")(audit_cmd.audit)
    app.command("train-eval")(train_eval_cmd.train_eval)
    app.add_typer(prior_cmd.app, name="prior")


def main(argv: list[str] | None = None) -> None:
    debug = os.environ.get("MISHIELD_DEBUG") == "1"
    try:
        _register()
        app(args=argv, standalone_mode=False)
    except MishieldError as err:
        if debug:
            raise
        typer.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        if debug:
            raise
        typer.echo("interrupted.", err=True)
        sys.exit(130)
    except Exception as err:  # click's own usage errors come through here too
        import click

        if isinstance(err, click.exceptions.ClickException):
            err.show()
            sys.exit(err.exit_code)
        if isinstance(err, (click.exceptions.Exit,)):
            sys.exit(err.exit_code)
        if isinstance(err, click.exceptions.Abort):
            typer.echo("aborted.", err=True)
            sys.exit(130)
        if debug:
            raise
        typer.echo(
            f"error: internal error ({type(err).__name__}: {err}); rerun with MISHIELD_DEBUG=1 "
            "for the traceback and report it.",
            err=True,
        )
        sys.exit(1)
