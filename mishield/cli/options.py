"""Option declarations shared by every command, so each flag means the same everywhere."""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Annotated

import typer

ModelArg = Annotated[
    str,
    typer.Argument(
        help="Model file (.pt/.pth/.bin/.safetensors, a mishield file, TorchScript, .pt2) "
        "or an architecture spec such as torchvision:resnet50 (random weights).",
        show_default=False,
    ),
]
ArchOpt = Annotated[
    str | None,
    typer.Option("--arch", help="Architecture: timm:NAME, torchvision:NAME or package.module:factory."),
]
NumClassesOpt = Annotated[
    int | None,
    typer.Option("--num-classes", min=1, help="Number of classes (default: inferred from the classifier weight)."),
]
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust-checkpoint",
        help="Allow files that run code when loaded: pickled Python objects, TorchScript and .pt2 programs, "
        "factories a file records (only for files you trust).",
    ),
]
InputSizeOpt = Annotated[
    int | None,
    typer.Option("--input-size", min=8, help="Square input size in pixels (default: from the model)."),
]
# An upper bound for every --batch-size: larger values are no batch any device holds, and
# 10**23 would otherwise reach Python's and torch's index arithmetic and fail there (exit 1).
MAX_BATCH_SIZE = 1 << 20
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout and nothing else.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")]
StageOpt = Annotated[
    int | None,
    typer.Option("--stage", help="Resolution stage to rewrite (0-based; negative counts from the end; default -1)."),
]
SitesOpt = Annotated[
    list[str] | None,
    typer.Option("--sites", help="Glob over skip-site names (e.g. 'layer4.*'); repeatable; overrides --stage."),
]



def parse_floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    """`0.5,0.5,0.5` -> (0.5, 0.5, 0.5); None stays None."""
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        from mishield.errors import UsageError

        raise UsageError(f"{flag} takes comma-separated numbers such as 0.5,0.5,0.5, not {text!r}.") from None


MeanOpt = Annotated[
    str | None,
    typer.Option("--mean", metavar="M[,M,M]", help="Normalisation mean per channel (default: from the model or file)."),
]
StdOpt = Annotated[
    str | None,
    typer.Option("--std", metavar="S[,S,S]", help="Normalisation std per channel (default: from the model or file)."),
]


# Library errors name parameters in backticks (`val_fraction`); on the command line they are flags.
# Names whose flag is not simply --name-with-dashes:
_FLAG_EXCEPTIONS = {"model": "MODEL", "models": "MODEL", "samples": "-S/--samples", "candidates": "-C/--candidates",
                    "iterations": "-I/--iterations", "keep": "-K/--keep", "final_augmentations": "-A/--final-augmentations",
                    "attacks": "--attack", "surrogates": "--surrogate", "eval_model": "--eval-model"}
# The options `load_options` passes to `load_model` in every command that loads models.
LOAD_PARAMETERS = ("arch", "num_classes", "trust_checkpoint", "input_size", "mean", "std")


def flag_for(param: str) -> str:
    return _FLAG_EXCEPTIONS.get(param, "--" + param.replace("_", "-"))


def flags_in_text(message: str, names: Iterable[str]) -> str:
    """`message` with each backticked parameter of `names` written as its flag (`val_fraction` ->
    --val-fraction); other backticked words (`none`, `z_dim`) stay as they are."""
    names = set(names)

    def flag(m: re.Match) -> str:
        return flag_for(m.group(1)) if m.group(1) in names else m.group(0)

    return re.sub(r"`([a-z][a-z0-9_]*)`", flag, message)


def flag_names(*functions: Callable, extra: Iterable[str] = LOAD_PARAMETERS) -> set[str]:
    """The parameter names a command's messages may name: those of `functions` and `extra`."""
    return set(extra).union(*(inspect.signature(f).parameters for f in functions))


_NAMES: list[set[str]] = []  # the names of the `flags_in_errors` blocks now running, innermost last


@contextmanager
def flags_in_errors(*functions: Callable, extra: Iterable[str] = LOAD_PARAMETERS) -> Iterator[None]:
    """Re-raise a library error with each of `functions`' parameters (and `extra`) that its message
    names in backticks written as its CLI flag; the warnings the library logs meanwhile are written
    the same way (`FlagWarnings`), so that the command line never reads `val_fraction` for --val-fraction."""
    from mishield.errors import MishieldError

    names = flag_names(*functions, extra=extra)
    _NAMES.append(names)
    try:
        yield
    except MishieldError as err:
        if "`" in str(err):  # the same exception (type, exit code, attributes kept), its sentence reworded
            err.args = (flags_in_text(str(err), names),)
        raise
    finally:
        _NAMES.remove(names)


class FlagWarnings(logging.Handler):
    """Prints the library's warnings (the `mishield` logger) on stderr as `warning: ...`, each
    parameter written as the flag of the command that runs (`flags_in_errors`)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        from mishield.cli import console

        try:
            text = flags_in_text(record.getMessage(), set().union(*_NAMES))
            console.err.print(f"warning: {text}", markup=False, highlight=False, soft_wrap=True)
        except Exception:  # noqa: BLE001 - logging's own rule: a failed report never stops the run
            self.handleError(record)
