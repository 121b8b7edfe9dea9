"""The exit-code contract of every command, as a pipeline sees it (docs/reliability.md):
0 ok, 1 internal error, 2 usage, 3 bad input, 4 privacy gate, 5 ONNX parity, 130 interrupted.

Usage errors come from click, which typer >= 0.16 bundles as its own copy: these tests run the
real `mishield.cli.main` with the typer/click that is installed, and a few run a real process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from attack_support import noise_image_folder
from clirun import run_cli as run

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny ImageFolder, a damaged model file and a real (small) checkpoint."""
    root = tmp_path_factory.mktemp("exit-codes")
    noise_image_folder(root / "data", per_class=4)
    damaged = root / "damaged.pt"
    damaged.write_bytes(b"PK\x03\x04" + os.urandom(400))  # a zip header, then garbage
    return {"data": root / "data", "damaged": damaged, "missing": root / "no-such-dir"}


def _argv(template: list[str], files: dict[str, Path], tmp_path: Path) -> list[str]:
    values = {f"{{{k}}}": str(v) for k, v in files.items()} | {"{tmp}": str(tmp_path)}
    out = []
    for arg in template:
        for key, value in values.items():
            arg = arg.replace(key, value)
        out.append(arg)
    return out


TINY = ["--arch", "attack_support:tiny_resnet", "--num-classes", "3", "--input-size", "16"]
AUDIT = ["--eval-model", "attack_support:small_plain_cnn", "--prior", "none", "--device", "cpu"]

USAGE = {  # command -> argument lists that are usage errors (exit 2)
    "inspect": [
        ["inspect", "{damaged}", "--num-classes", "abc"],  # a bad value
        ["inspect", "{damaged}", "--frobnicate"],  # an unknown option
        ["inspect"],  # a missing argument
    ],
    "harden": [
        ["harden", "{damaged}"],  # --out missing
        ["harden", "{damaged}", "--alpha", "2", "--out", "{tmp}/h.pt"],
        ["harden", "{damaged}", "--epochs", "-1", "--out", "{tmp}/h.pt"],
    ],
    "export": [
        ["export", "{damaged}"],
        ["export", "{damaged}", "--atol", "tiny", "--out", "{tmp}/m.onnx"],
    ],
    "audit": [
        ["audit", "{damaged}", "--out", "{tmp}/a"],  # --data missing
        ["audit", "{damaged}", "--data", "{data}", "-S", "0", "--out", "{tmp}/a"],
    ],
    "prior train": [
        ["prior", "train", "--data", "{data}"],
        ["prior", "train", "--data", "{data}", "--out", "{tmp}/p.safetensors", "--epochs", "0"],
    ],
    "train-eval": [
        ["train-eval", "--out", "{tmp}/e.pt"],
        ["train-eval", "--data", "{data}", "--out", "{tmp}/e.pt", "--input-size", "4"],
    ],
    "surrogate train": [
        ["surrogate", "train", "{damaged}", "--out", "{tmp}/s.pt"],  # --public missing
        ["surrogate", "train", "{damaged}", "--public", "{data}", "--out", "{tmp}/s.pt", "--epochs", "0"],
    ],
}

BAD_INPUT = {  # command -> a damaged model file or a missing data folder (exit 3)
    "inspect": ["inspect", "{damaged}"],
    "harden": ["harden", "{damaged}", "--out", "{tmp}/h.pt"],
    "export": ["export", "{damaged}", "--out", "{tmp}/m.onnx"],
    "audit": ["audit", "{damaged}", "--data", "{data}", "--out", "{tmp}/a", *AUDIT],
    "prior train": ["prior", "train", "--data", "{missing}", "--out", "{tmp}/p.safetensors", "--device", "cpu"],
    "train-eval": ["train-eval", "--data", "{missing}", "--out", "{tmp}/e.pt", "--device", "cpu", *TINY[:2]],
    "surrogate train": ["surrogate", "train", "{damaged}", "--public", "{data}", "--out", "{tmp}/s.pt", "--device", "cpu"],
}


@pytest.mark.parametrize(("command", "index"), [(c, i) for c, cases in USAGE.items() for i in range(len(cases))])
def test_usage_errors_exit_2(command, index, files, tmp_path, capsys):
    code, out, err = run(_argv(USAGE[command][index], files, tmp_path), capsys)
    assert code == 2, err
    assert "Error:" in err and "internal error" not in err and "Traceback" not in err
    assert out == ""
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("command", list(BAD_INPUT))
def test_bad_input_exits_3_with_one_sentence(command, files, tmp_path, capsys):
    code, out, err = run(_argv(BAD_INPUT[command], files, tmp_path), capsys)
    assert code == 3, err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("warning: ")]  # warnings may come first
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert out == "" and not any(tmp_path.iterdir())


@pytest.mark.parametrize("argv", [["frobnicate"], ["prior", "frobnicate"], ["--no-such-flag"]])
def test_unknown_commands_exit_2(argv, capsys):
    code, _, err = run(argv, capsys)
    assert code == 2 and ("No such command" in err or "No such option" in err), err


@pytest.mark.parametrize("argv", [[], ["prior"]])
def test_bare_command_prints_help_and_exits_2(argv, capsys):
    # no_args_is_help: the help is shown, but a pipeline that forgot its arguments must not pass
    code, out, err = run(argv, capsys)
    assert code == 2
    assert "Usage" in out + err and "Commands" in out + err


@pytest.mark.parametrize("argv", [["--help"], ["inspect", "--help"], ["prior", "train", "--help"], ["audit", "--help"]])
def test_help_exits_0_on_stdout(argv, capsys):
    code, out, err = run(argv, capsys)
    assert code == 0 and "Usage" in out and err == ""


def test_ctrl_c_exits_130(monkeypatch, files, capsys):
    import mishield.models

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mishield.models, "load_model", interrupted)
    code, _, err = run(["inspect", files["damaged"]], capsys)
    assert code == 130 and "interrupted" in err and "Traceback" not in err


def test_an_exit_code_raised_inside_a_command_is_kept(monkeypatch, files, capsys):
    # click returns (not raises) a typer.Exit's code outside standalone mode; dropping it exits 0
    import typer

    import mishield.models

    def gate(*args, **kwargs):
        raise typer.Exit(4)

    monkeypatch.setattr(mishield.models, "load_model", gate)
    code, _, _ = run(["inspect", files["damaged"]], capsys)
    assert code == 4


def test_a_real_bug_is_exit_1_in_one_sentence(monkeypatch, files, capsys):
    import mishield.models

    def bug(*args, **kwargs):
        return 1 / 0

    monkeypatch.setattr(mishield.models, "load_model", bug)
    code, _, err = run(["inspect", files["damaged"]], capsys)
    assert code == 1 and "internal error (ZeroDivisionError" in err and "Traceback" not in err


def _process(*args: str, **env: str) -> subprocess.CompletedProcess:
    environ = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])} | env
    return subprocess.run([sys.executable, "-m", "mishield", *args], capture_output=True, text=True, env=environ,
                          cwd=ROOT, timeout=300, check=False)


@pytest.mark.parametrize(("args", "code"), [
    (["inspect", "{damaged}", "--num-classes", "abc"], 2),  # the repro of the issue: it printed 1
    (["harden", "{damaged}"], 2),
    (["no-such-command"], 2),
    ([], 2),
    (["--help"], 0),
    (["inspect", "{damaged}"], 3),
])
def test_exit_codes_of_a_real_process(args, code, files, tmp_path):
    result = _process(*_argv(args, files, tmp_path))
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr


def test_pinned_click_is_the_one_typer_uses():
    """The exit-2 path recognises the click classes of whatever typer is installed."""
    import typer

    from mishield.cli import _click_classes

    assert issubclass(typer.BadParameter, _click_classes("ClickException"))
    assert issubclass(typer.Exit, _click_classes("Exit"))
    assert issubclass(typer.Abort, _click_classes("Abort"))
