"""The `mishield` command line: a thin layer over the library (one file per command).

`main()` owns the exit-code contract (docs/reliability.md): 0 ok, 1 internal error (a bug),
2 usage, 3 bad input, 4 privacy gate failed (or inconclusive), 5 ONNX parity failed,
6 an output could not be written (full disk, no permission, standard output refused), 130
interrupted, 141 the reader of a pipe went away (quietly, as Unix tools do), 143 terminated by
SIGTERM (a resumable state was saved). Every MishieldError
becomes one sentence on stderr and its exit code; with MISHIELD_DEBUG=1 the traceback is shown
instead.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import os
import sys

import typer

from mishield.errors import MishieldError, OutputError

app = typer.Typer(
    name="mishield",
    help="Harden image classifiers against model-inversion attacks, and audit how much they leak.",
    # Bare `mishield` prints the help on stderr and exits 2: it is a usage error, and a pipeline
    # that forgot its arguments must not read it as success (click >= 8.2 does the same).
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # Plain click help: rich's panels squeeze long flag names and descriptions at 80 columns and
    # print a `<bool>` metavar after every on/off flag as if it took a value.
    rich_markup_mode=None,
)

INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader left


def _print_version(value: bool) -> None:
    if value:
        from mishield import __version__

        typer.echo(f"mishield {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Harden image classifiers against model-inversion attacks, and audit how much they leak."""


def _register() -> None:
    # Imported here so `mishield --help` stays cheap to reach and import errors surface in main().
    if app.registered_commands:  # main() runs many times in one process under the tests
        return
    from mishield.cli import export_cmd, harden_cmd, inspect_cmd

    app.command("inspect", short_help="List skip connections and what RoLSS / SSF would change.")(inspect_cmd.inspect)
    app.command("harden", short_help="Rewrite skips (RoLSS / SSF), optionally fine-tune, write a model.")(harden_cmd.harden)
    app.command("export", short_help="Export to ONNX, checked against onnxruntime.")(export_cmd.export)

    from mishield.cli import audit_cmd, prior_cmd, surrogate_cmd, train_eval_cmd
    app.command("audit", short_help="Attack models with model inversion; report how much they leak.")(audit_cmd.audit)
    app.command("train-eval", short_help="Train the evaluation model that judges an audit.")(train_eval_cmd.train_eval)
    app.add_typer(prior_cmd.app, name="prior")
    app.add_typer(surrogate_cmd.app, name="surrogate")

    from mishield.cli import demo_cmd, env_cmd
    app.command("demo", short_help="The whole pipeline on built-in data, with an honest audit.")(demo_cmd.demo)
    app.command("env", short_help="Versions, devices and paths for bug reports.")(env_cmd.env)


def _click_classes(name: str) -> tuple[type, ...]:
    """`name` from every click the process may use: typer >= 0.16 bundles its own copy
    (typer._click), older typer uses the `click` package, and typer.Exit/Abort can be either.
    An isinstance check against one of them alone silently misses the others."""
    found: list[type] = []
    for module in ("typer._click.exceptions", "typer.exceptions", "click.exceptions"):
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if isinstance(cls, type) and cls not in found:
            found.append(cls)
    return tuple(found)


def _is_click_exception(err: BaseException) -> bool:
    # By class where we can name it; by shape (an int exit_code and a show() method) otherwise,
    # so a future click that moves its classes again still gets exit 2 for usage errors.
    if isinstance(err, _click_classes("ClickException")):
        return True
    return isinstance(getattr(err, "exit_code", None), int) and callable(getattr(err, "show", None))


def _exit_for(err: Exception, debug: bool) -> int:
    """The exit code for an exception that escaped a command, after printing why."""
    if _is_click_exception(err):  # usage errors (2) and click's file errors (1)
        err.show()
        return err.exit_code
    if isinstance(err, _click_classes("Exit")):
        return int(getattr(err, "exit_code", 0) or 0)
    if isinstance(err, _click_classes("Abort")):  # click turns Ctrl-C at a prompt into Abort
        typer.echo("interrupted.", err=True)
        return INTERRUPTED
    if isinstance(err, BrokenPipeError):  # `mishield inspect m.pt | head`: the reader left, nothing to report
        _silence_stdout()
        return BROKEN_PIPE
    refused = _stdout_refusal(err)
    if refused is not None:  # stdout on a full disk or /dev/full: say so instead of "internal error"
        typer.echo(f"error: {refused}", err=True)
        return refused.exit_code
    if debug:
        raise err
    typer.echo(
        f"error: internal error ({type(err).__name__}: {err}); rerun with MISHIELD_DEBUG=1 "
        "for the traceback and report it.",
        err=True,
    )
    return 1


def _is_broken_pipe(err: BaseException | None) -> bool:
    return isinstance(err, BrokenPipeError) or (isinstance(err, OSError) and err.errno == errno.EPIPE)


def _stdout_refusal(err: BaseException) -> OutputError | None:
    """An OSError that came from standard output, as the one sentence it should be (exit 6).

    Which stream failed is not in the exception; a stdout that fails again on flush (its buffer
    still holds what it refused) is the one. It is then pointed at /dev/null, or Python's own
    flush at exit would print a second error.
    """
    if not isinstance(err, OSError) or isinstance(err, BrokenPipeError):
        return None
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        return None
    except (OSError, ValueError) as again:  # ValueError: a closed stream
        return _stdout_refused(getattr(again, "strerror", None) or err.strerror or str(again))
    return None


def _finish_stdout() -> None:
    """Flush what the command printed while the exit code can still say it was not written."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
        sys.exit(BROKEN_PIPE)
    except OSError as err:
        refused = _stdout_refused(err.strerror or str(err))
        typer.echo(f"error: {refused}", err=True)
        sys.exit(refused.exit_code)


def _silence_stdout() -> None:
    from mishield.cli import console  # rich only once a command runs

    console.silence_stdout()


def _stdout_refused(cause: str) -> OutputError:
    from mishield.cli import console

    return console.stdout_refused(cause)


def _quiet_library_notices(debug: bool) -> None:
    """Hide torch notices that break the one-sentence errors and say nothing a user can act on:
    the weights-only unpickler's note on pickle protocols (printed when mishield inspects an
    untrusted file before refusing it) and TorchScript's deprecation notice."""
    if debug:
        return
    import warnings

    warnings.filterwarnings("ignore", message=r"Detected pickle protocol \d+ in the checkpoint", category=UserWarning)
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated", category=FutureWarning)


@contextlib.contextmanager
def _library_warnings():
    """The library's logged warnings as `warning: ...` lines naming flags (`options.FlagWarnings`)."""
    import logging

    from mishield.cli.options import FlagWarnings

    logger, handler = logging.getLogger("mishield"), FlagWarnings()
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def main(argv: list[str] | None = None) -> None:
    debug = os.environ.get("MISHIELD_DEBUG") == "1"
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        from mishield.cli import console

        # Before any command runs: the consoles follow this run's streams, NO_COLOR and --json.
        console.configure(json_output="--json" in args)
        _quiet_library_notices(debug)
        _register()
        with _library_warnings():
            code = app(args=args, prog_name="mishield", standalone_mode=False)
    except MishieldError as err:
        if debug:
            raise
        typer.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        if debug:
            raise
        typer.echo("interrupted.", err=True)
        sys.exit(INTERRUPTED)
    except Exception as err:  # noqa: BLE001 - the one place that maps every failure to an exit code
        sys.exit(_exit_for(err, debug))
    except SystemExit as exit_:
        # click (and rich) end a run whose stdout reader left with exit 1, which this contract
        # keeps for mishield's own bugs; a shell reports 141 for such a writer.
        if exit_.code == 1 and _is_broken_pipe(exit_.__context__):
            _silence_stdout()
            sys.exit(BROKEN_PIPE)
        raise
    _finish_stdout()
    # Without standalone mode click *returns* the code of a typer.Exit (and typer turns Ctrl-C
    # inside a command into Exit(130)) instead of raising it; dropping it would exit 0.
    if isinstance(code, int) and not isinstance(code, bool) and code != 0:
        if code == INTERRUPTED:
            typer.echo("interrupted.", err=True)
        sys.exit(code)
