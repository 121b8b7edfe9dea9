"""What mishield writes and where (docs/reliability.md): an output never replaces an input
(same file, symlink, hard link, a file of the data folder), outputs are checked before the
expensive work, writes are atomic and never clobber a racing writer, and logs work without a
terminal (plain lines, no escape codes under NO_COLOR, only the JSON document on stdout)."""

from __future__ import annotations

import hashlib
import json
import os
import pty
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from attack_support import noise_image_folder, tiny_resnet
from clirun import run_cli as run

from mishield.errors import OutputError, UsageError
from mishield.fileio import atomic_output, check_writable

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
TINY = ["--arch", "attack_support:tiny_resnet", "--num-classes", "3", "--input-size", "16"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("outputs") / "data"
    noise_image_folder(root, per_class=4)
    return root


@pytest.fixture
def model(tmp_path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "model.pt"
    torch.save(tiny_resnet(num_classes=3).state_dict(), path)
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _alias(kind: str, model: Path) -> Path:
    """`model` itself, a symlink to it or a hard link to it."""
    if kind == "same":
        return model
    alias = model.with_name(f"{kind}.pt")
    (alias.symlink_to if kind == "symlink" else alias.hardlink_to)(model)
    return alias


@pytest.mark.parametrize("kind", ["same", "symlink", "hardlink"])
@pytest.mark.parametrize("command", ["export", "harden"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_an_output_that_is_the_input_is_refused(command, kind, overwrite, model, capsys):
    before = _sha(model)
    out = _alias(kind, model)
    argv = [command, str(model), *TINY, "--out", str(out)] + (["--overwrite"] if overwrite else [])
    code, stdout, err = run(argv, capsys)
    assert code == 2, err
    assert "never replaces its input" in err and stdout == ""
    assert _sha(model) == before and _sha(out) == before
    assert out.is_symlink() == (kind == "symlink")


@pytest.mark.parametrize("command", ["prior", "train-eval"])
def test_trainers_never_overwrite_their_training_images(command, data, capsys):
    image = data / "a" / "0.png"
    before = _sha(image)
    argv = (["prior", "train"] if command == "prior" else ["train-eval", "--arch", "attack_support:tiny_resnet"])
    code, _, err = run([*argv, "--data", str(data), "--out", str(image), "--overwrite", "--device", "cpu"], capsys)
    assert code == 2 and "would overwrite the input" in err, err
    assert _sha(image) == before


def test_audit_out_that_is_a_file_fails_before_loading_anything(data, tmp_path, capsys):
    report = tmp_path / "report.txt"
    report.write_text("keep me")
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(os.urandom(64))  # would be exit 3 if the model were loaded first
    argv = ["audit", str(damaged), "--data", str(data), "--eval-model", "x", "--prior", "none", "--out", str(report)]
    code, _, err = run(argv, capsys)
    assert code == 2 and "existing file" in err, err
    assert report.read_text() == "keep me"


def test_audit_report_inside_the_data_folder_is_refused(data, tmp_path, capsys):
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(os.urandom(64))
    argv = ["audit", str(damaged), "--data", str(data), "--eval-model", "x", "--prior", "none", "--out", str(data / "report")]
    code, _, err = run(argv, capsys)
    assert code == 2 and "inside the input folder" in err, err
    assert not (data / "report").exists()


def test_check_writable_under_a_file_is_a_usage_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        check_writable(tmp_path / "f" / "out.pt", overwrite=False)


def test_a_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "model.pt"
    target.write_text("old")
    # a full disk is an output that cannot be written (exit 6), not an internal error
    with pytest.raises(OutputError, match="cannot write .*model.pt .No space left on device") as info, \
            atomic_output(target, overwrite=True) as tmp:
        tmp.write_text("half of the new")
        raise OSError(28, "No space left on device")
    assert info.value.exit_code == 6
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_the_slower_of_two_writers_is_refused(tmp_path):
    target = tmp_path / "model.pt"
    with pytest.raises(UsageError, match="appeared while writing"), atomic_output(target) as first:
        first.write_text("first")
        with atomic_output(target) as second:
            second.write_text("second")
    assert target.read_text() == "second"  # the published file is whole and untouched
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_plain_progress_is_rate_limited_lines():
    from mishield.cli.progress import PlainProgress

    now = [0.0]
    lines: list[str] = []
    progress = PlainProgress(lines.append, interval=10.0, clock=lambda: now[0])
    for step in range(101):
        now[0] = step * 0.5  # 50 s for 100 steps
        progress("attack", step, 100)
    assert lines[0].startswith("attack: 0/100 (0 %)")
    assert lines[-1].startswith("attack: 100/100 (100 %), 0:00:50 elapsed")
    assert any(line.startswith("attack: 25/100 (25 %)") for line in lines)
    assert "left" in lines[1]
    assert 5 <= len(lines) <= 10  # quarters plus at most one line per 10 s, not one per step
    progress("attack", 0, 100)  # the label reused by a new phase starts over
    assert lines[-1].startswith("attack: 0/100")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "NO_COLOR", "TERM")}
    return env | {"PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)]), "COLUMNS": "120", "OMP_NUM_THREADS": "1"} | extra


PRIOR = ["prior", "train", "--resolution", "32", "--width", "4", "--latent-dim", "8", "--epochs", "1",
         "--batch-size", "4", "--device", "cpu", "--json"]


def test_logs_without_a_terminal_are_plain_lines_and_stdout_is_one_json(data, tmp_path):
    log = tmp_path / "stderr.log"
    with open(log, "w") as stderr:
        result = subprocess.run(
            [sys.executable, "-m", "mishield", *PRIOR, "--data", str(data), "--out", str(tmp_path / "p.safetensors")],
            stdout=subprocess.PIPE, stderr=stderr, text=True, env=_env(NO_COLOR="1"), timeout=300, check=False,
        )  # fmt: skip
    text = log.read_text()
    assert result.returncode == 0, text
    assert json.loads(result.stdout)["resolution"] == 32  # one document, nothing else on stdout
    assert "\x1b[" not in text and "\r" not in text
    lines = [ln for ln in text.splitlines() if ln.strip()]
    # progress lines ("phase: done/total (..%), elapsed") and one summary line per epoch
    assert lines and all(("/" in ln and "elapsed" in ln) or " epoch " in ln for ln in lines), text
    assert any("100 %" in ln for ln in lines)
    assert any(" epoch 1/1" in ln for ln in lines)


def _on_a_terminal(argv: list[str], **env: str) -> tuple[int, str, str]:
    """Run with stderr on a pseudo-terminal; return (code, stdout, what the terminal showed)."""
    master, slave = pty.openpty()
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                block = os.read(master, 4096)
            except OSError:  # the child closed the terminal
                return
            if not block:
                return
            chunks.append(block)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    proc = subprocess.run([sys.executable, "-m", "mishield", *argv], stdout=subprocess.PIPE, stderr=slave,
                          text=True, env=_env(**env), timeout=300, check=False)
    os.close(slave)
    reader.join(timeout=10)
    os.close(master)
    return proc.returncode, proc.stdout, b"".join(chunks).decode(errors="replace")


def test_no_color_means_no_escape_codes_even_on_a_terminal(data, tmp_path):
    code, stdout, terminal = _on_a_terminal([*PRIOR, "--data", str(data), "--out", str(tmp_path / "p.safetensors")],
                                            NO_COLOR="1", TERM="xterm-256color")
    assert code == 0, terminal
    assert "\x1b[" not in terminal and "100 %" in terminal
    assert json.loads(stdout)["channels"] == 1


def test_inspect_result_goes_to_stdout(model, tmp_path):
    result = subprocess.run([sys.executable, "-m", "mishield", "inspect", str(model), *TINY], capture_output=True,
                            text=True, env=_env(NO_COLOR="1"), timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert "skip connections" in result.stdout and "\x1b[" not in result.stdout
    assert "skip connections" not in result.stderr
