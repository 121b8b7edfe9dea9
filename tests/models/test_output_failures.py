"""Outputs that cannot be written, or must not be (docs/reliability.md):

* an `--out` that exists and is not a regular file (a device such as /dev/null, a FIFO, a
  directory; for `audit` anything but a folder) is refused, `--overwrite` or not (exit 2);
* a full disk (torch's writer raises RuntimeError, not OSError), a folder that cannot be written
  and a standard output that refuses data (/dev/full) are one sentence naming the path and the
  cause, exit 6 (`OutputError`);
* output piped into a reader that leaves (`| head`) ends quietly, exit 141.

The device cases use a symlink to /dev/null in the test's folder: a mishield that replaced the
output would replace the link, never the machine's /dev/null.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from attack_support import noise_image_folder, tiny_resnet
from clirun import run_cli as run

from mishield.errors import OutputError, UsageError
from mishield.fileio import atomic_output, check_writable

TESTS = Path(__file__).parent
ROOT = TESTS.parent
TINY = ["--arch", "attack_support:tiny_resnet", "--num-classes", "3", "--input-size", "16"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("outputs")
    noise_image_folder(root / "data", per_class=4)
    good = root / "good.pt"
    torch.save(tiny_resnet(num_classes=3).state_dict(), good)
    return {"data": root / "data", "good": good}


def _one_sentence(err: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("warning: ")]  # warnings may come first
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "internal error" not in err and "Traceback" not in err


def _device_link(tmp_path: Path) -> Path:
    link = tmp_path / "out.bin"
    link.symlink_to(os.devnull)
    return link


COMMANDS = {  # every command that writes a file, with `--out` left to the test
    "export": lambda f: ["export", f["good"], *TINY],
    "harden": lambda f: ["harden", f["good"], *TINY],
    "train-eval": lambda f: ["train-eval", "--data", f["data"], "--epochs", "1", "--device", "cpu"],
    "prior train": lambda f: ["prior", "train", "--data", f["data"], "--epochs", "1", "--device", "cpu"],
    "surrogate train": lambda f: ["surrogate", "train", f["good"], *TINY, "--public", f["data"], "--epochs", "1",
                                  "--device", "cpu"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_device_as_out_is_refused_even_with_overwrite(command, files, tmp_path, capsys):
    link = _device_link(tmp_path)
    code, _, err = run([*COMMANDS[command](files), "--out", link, "--overwrite"], capsys)
    assert code == 2, err
    _one_sentence(err)
    assert "a device" in err and "regular file" in err
    assert link.is_symlink() and stat.S_ISCHR(os.stat(link).st_mode)  # still the device


def test_a_fifo_or_a_directory_as_out_is_refused(files, tmp_path, capsys):
    fifo = tmp_path / "pipe.onnx"
    os.mkfifo(fifo)
    code, _, err = run(["export", files["good"], *TINY, "--out", fifo, "--overwrite"], capsys)
    assert code == 2 and "a FIFO" in err, err
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    code, _, err = run(["export", files["good"], *TINY, "--out", tmp_path, "--overwrite"], capsys)
    assert code == 2 and "is a directory" in err, err
    with pytest.raises(UsageError, match="a FIFO, not a regular file"):
        check_writable(fifo, overwrite=True)
    with pytest.raises(UsageError, match="a FIFO"), atomic_output(fifo, overwrite=True) as tmp:
        tmp.write_text("never")


def test_audit_out_must_be_a_folder_and_its_files_regular(files, tmp_path, capsys):
    audit = ["audit", files["good"], *TINY, "--data", files["data"], "--eval-model", "attack_support:small_plain_cnn",
             "--prior", "none", "--device", "cpu", "--overwrite"]
    link = _device_link(tmp_path)
    code, _, err = run([*audit, "--out", link], capsys)
    assert code == 2 and "not a folder" in err, err
    report = tmp_path / "report"
    report.mkdir()
    os.mkfifo(report / "report.json")
    code, _, err = run([*audit, "--out", report], capsys)
    assert code == 2 and "report.json is a FIFO" in err, err
    assert stat.S_ISFIFO(os.stat(report / "report.json").st_mode)


# --------------------------------------------------------------------------- exit 6


TORCH_FULL_DISK = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"  # torch 2.x on ENOSPC


def _torch_save_on_a_full_disk(obj, f, *args, **kwargs):
    Path(f).write_bytes(b"PK\x03\x04 half an archive")
    raise RuntimeError(TORCH_FULL_DISK)


@pytest.mark.parametrize("disk_full", [True, False])
def test_a_full_disk_while_saving_is_exit_6_naming_the_path(disk_full, files, tmp_path, monkeypatch, capsys):
    import mishield.fileio

    monkeypatch.setattr(torch, "save", _torch_save_on_a_full_disk)
    if disk_full:  # what statvfs reports once the disk filled up
        monkeypatch.setattr(mishield.fileio, "_free_bytes", lambda directory: 0)
    out = tmp_path / "h.pt"
    code, _, err = run(["harden", files["good"], *TINY, "--out", out], capsys)
    assert code == 6, err
    _one_sentence(err)
    assert str(out) in err
    assert ("no space left on the device" in err) if disk_full else ("torch's writer failed" in err)
    assert list(tmp_path.iterdir()) == []  # no output, no temporary file left behind


def test_an_unwritable_folder_is_exit_6_before_the_work(files, tmp_path, monkeypatch, capsys):
    import mishield.fileio
    import mishield.models

    locked = tmp_path / "locked"
    locked.mkdir()

    def loads(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    real_access = os.access
    monkeypatch.setattr(mishield.fileio.os, "access", lambda p, mode: Path(p) != locked and real_access(p, mode))
    monkeypatch.setattr(mishield.models, "load_model", loads)
    code, _, err = run(["export", files["good"], *TINY, "--out", locked / "sub" / "m.onnx"], capsys)
    assert code == 6, err
    _one_sentence(err)
    assert f"{locked} is not writable (permission denied)" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only-mode folder")
def test_a_folder_without_write_permission_is_exit_6(files, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, _, err = run(["export", files["good"], *TINY, "--out", locked / "m.onnx"], capsys)
    assert code == 6 and "not writable" in err, err


def test_a_write_the_file_system_refuses_is_exit_6(files, tmp_path, monkeypatch, capsys):
    import tempfile

    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    out = tmp_path / "h.pt"
    code, _, err = run(["harden", files["good"], *TINY, "--out", out], capsys)
    assert code == 6, err
    assert f"cannot write {out} (Permission denied)" in err
    with pytest.raises(OutputError, match="Permission denied") as info, atomic_output(out) as tmp:
        tmp.write_text("never")
    assert info.value.exit_code == 6 and not out.exists()


class _FullStream(io.RawIOBase):
    """A standard output on a full disk: every write fails with ENOSPC (as /dev/full does)."""

    full = True

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return len(data)


@pytest.mark.parametrize("extra", [[], ["--json"]])
def test_stdout_on_a_full_disk_is_exit_6(extra, monkeypatch, capsys):
    raw = _FullStream()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BufferedWriter(raw), encoding="utf-8"))
    try:
        code, _, err = run(["inspect", "attack_support:tiny_resnet", "--input-size", "16", *extra], capsys)
    finally:
        raw.full = False  # the wrapper's last flush, at garbage collection, must not fail
    assert code == 6, err
    _one_sentence(err)
    assert "cannot write to standard output (No space left on device)" in err


def _process(*args: str, **kwargs) -> subprocess.Popen:
    environ = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
    return subprocess.Popen([sys.executable, "-m", "mishield", *args], env=environ, cwd=ROOT, stderr=subprocess.PIPE,
                            **kwargs)


@pytest.mark.skipif(not (os.path.exists("/dev/full") and stat.S_ISCHR(os.stat("/dev/full").st_mode)),
                    reason="no /dev/full device on this machine")
def test_stdout_on_dev_full_is_exit_6_in_a_real_process():
    with open("/dev/full", "w") as full:
        proc = _process("inspect", "attack_support:tiny_resnet", "--input-size", "16", "--json", stdout=full)
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 6, err
    assert err.decode().strip().startswith("error: cannot write to standard output")


@pytest.mark.parametrize("extra", [[], ["--json"]])
def test_a_reader_that_leaves_ends_the_run_quietly(extra):
    """`mishield inspect ... | head`: the pipe is closed before mishield writes a byte."""
    proc = _process("inspect", "attack_support:tiny_resnet", "--input-size", "16", *extra, stdout=subprocess.PIPE)
    proc.stdout.close()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 141, err  # 128 + SIGPIPE, as a shell reports for `yes | head`; rich/click said 1
    assert err == b""
