"""What a command claims before its work (docs/reliability.md, `mishield.fileio.claim_output`):

* every file it writes, appends to or deletes beside `--out` (harden's OUT.train.jsonl and
  OUT.train-state, the prior's OUT.samples.png, a trainer's state, the search's work folder) is
  checked against every input, as `--out` is, and refused (exit 2) with the input untouched;
* a lock on the output: a second run with the same `--out` stops at once (exit 2, one sentence,
  nothing written), for every command that writes, from the CLI and from the library;
* an audit report is written into a temporary sibling folder and put in place at the end;
* only a complete torchrun environment means torchrun: a stray RANK is exit 2, never an exit 0
  without the output.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from attack_support import noise_image_folder, tiny_resnet
from clirun import run_cli as run

from mishield.errors import UsageError
from mishield.fileio import check_side_file, lock_path_for, output_lock, staged_folder
from mishield.launch import Launch, torchrun_launch

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--arch", "attack_support:tiny_resnet", "--num-classes", "3", "--input-size", "16"]
TORCHRUN = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("claims")
    noise_image_folder(root / "data", per_class=4)
    good = root / "good.pt"
    torch.manual_seed(0)
    torch.save(tiny_resnet(num_classes=3).state_dict(), good)
    return {"data": root / "data", "good": good}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _one_sentence(err: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("warning: ")]  # warnings may come first
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "internal error" not in err


def _model_at(path: Path) -> Path:
    torch.manual_seed(1)
    torch.save(tiny_resnet(num_classes=3).state_dict(), path)
    return path


# --------------------------------------------------------------------------- side files vs inputs


def test_harden_never_deletes_an_input_named_like_its_state(files, tmp_path, capsys):
    out = tmp_path / "hard.pt"
    model = _model_at(tmp_path / "hard.pt.train-state")  # the state `--overwrite` would delete
    before = _sha(model)
    code, _, err = run(["harden", model, *TINY, "--data", files["data"], "--epochs", "1", "--device", "cpu",
                             "--out", out, "--overwrite"], capsys)
    assert code == 2, err
    _one_sentence(err)
    assert "hard.pt.train-state" in err and "input" in err
    assert _sha(model) == before and not out.exists()


def test_harden_never_appends_to_a_recipe_named_like_its_log(files, tmp_path, capsys):
    out = tmp_path / "hard.pt"
    recipe = tmp_path / "hard.pt.train.jsonl"
    recipe.write_text("epochs: 1\n")
    code, _, err = run(["harden", files["good"], *TINY, "--data", files["data"], "--device", "cpu", "--recipe", recipe,
                        "--out", out], capsys)
    assert code == 2 and "hard.pt.train.jsonl" in err and "input" in err, err
    assert recipe.read_text() == "epochs: 1\n" and not out.exists()


def test_the_library_checks_harden_side_files_too(files, tmp_path):
    from mishield import HardenConfig, harden

    model = _model_at(tmp_path / "hard.pt.train.jsonl")
    before = _sha(model)
    with pytest.raises(UsageError, match="hard.pt.train.jsonl, which this run writes beside its output"):
        harden(model, config=HardenConfig(epochs=1, device="cpu", overwrite=True), data=files["data"],
               out=tmp_path / "hard.pt", load_options={"arch": "attack_support:tiny_resnet", "num_classes": 3})
    assert _sha(model) == before


def test_prior_train_never_replaces_an_image_named_like_its_samples(tmp_path, capsys):
    data = tmp_path / "data"
    noise_image_folder(data, per_class=4)
    image = next((data / "a").iterdir())
    out = image.with_name(image.name.removesuffix(".samples.png") + "-x")  # a new file beside the images
    samples = out.with_name(out.name + ".samples.png")
    image.rename(samples)  # an image of class a is exactly the prior's samples grid
    before = _sha(samples)
    code, _, err = run(["prior", "train", "--data", data, "--epochs", "1", "--device", "cpu", "--out", out], capsys)
    assert code == 2 and "samples.png" in err and "input" in err, err
    assert _sha(samples) == before and not out.exists()


@pytest.mark.parametrize("command", ["train-eval", "surrogate train"])
def test_trainers_never_delete_an_input_named_like_their_state(command, files, tmp_path, capsys):
    out = tmp_path / "trained.pt"
    model = _model_at(tmp_path / "trained.pt.train-state")
    before = _sha(model)
    if command == "train-eval":  # the input named like the state is the --prior file
        argv = ["train-eval", "--data", files["data"], "--prior", model, "--epochs", "1"]
    else:
        argv = ["surrogate", "train", model, *TINY, "--public", files["data"], "--epochs", "1"]
    code, _, err = run([*argv, "--device", "cpu", "--out", out, "--overwrite"], capsys)
    assert code == 2 and "trained.pt.train-state" in err, err
    assert _sha(model) == before and not out.exists()


def test_the_search_never_deletes_an_input_inside_its_work_folder(files, tmp_path):
    from mishield import SearchConfig, search_defences

    work = tmp_path / "picked.pt.search.d"
    work.mkdir()
    model = _model_at(work / "original.pt")  # `overwrite` removes the whole work folder
    with pytest.raises(UsageError, match="holds the input"):
        search_defences(model, data=files["data"], prior="none", out=tmp_path / "picked.pt",
                        config=SearchConfig(overwrite=True, load_options={"arch": "attack_support:tiny_resnet",
                                                                          "num_classes": 3}))
    assert model.is_file()


def test_a_fifo_beside_the_output_is_refused(tmp_path):
    fifo = tmp_path / "m.pt.train.jsonl"
    os.mkfifo(fifo)  # appending the log to it would block the run forever
    with pytest.raises(UsageError, match="a FIFO"):
        check_side_file(fifo)


# --------------------------------------------------------------------------- one run per output


HOLDER = ("import sys, time\nfrom mishield.fileio import output_lock\nwith output_lock(sys.argv[1]):\n"
          "    print('held', flush=True)\n    time.sleep(600)\n")


@pytest.fixture
def held(tmp_path):
    """Hold the lock of an output from another process, as a run writing it would."""
    holders = []

    def hold(out: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True,
                                env=dict(os.environ, PYTHONPATH=str(ROOT)))
        holders.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield hold
    for proc in holders:
        proc.kill()
        proc.wait()


COMMANDS = {  # every command that writes, with `--out` left to the test
    "harden": lambda f: ["harden", f["good"], *TINY],
    "harden --data": lambda f: ["harden", f["good"], *TINY, "--data", f["data"], "--epochs", "1", "--device", "cpu"],
    "export": lambda f: ["export", f["good"], *TINY],
    "train-eval": lambda f: ["train-eval", "--data", f["data"], "--epochs", "1", "--device", "cpu"],
    "prior train": lambda f: ["prior", "train", "--data", f["data"], "--epochs", "1", "--device", "cpu"],
    "surrogate train": lambda f: ["surrogate", "train", f["good"], *TINY, "--public", f["data"], "--epochs", "1",
                                  "--device", "cpu"],
    "audit": lambda f: ["audit", f["good"], *TINY, "--data", f["data"], "--eval-model", "attack_support:small_plain_cnn",
                        "--prior", "none", "--device", "cpu", "--preset", "ci"],
    "demo": lambda f: ["demo", "--quick", "--device", "cpu"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_second_run_on_the_same_output_stops_at_once(command, files, tmp_path, held, capsys):
    out = tmp_path / ("report" if command in ("audit", "demo") else "out.bin")
    held(out)
    code, stdout, err = run([*COMMANDS[command](files), "--out", out], capsys)
    assert code == 2, err
    _one_sentence(err)
    assert "another mishield run is writing" in err and stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == [lock_path_for(out).name]  # nothing written


def test_the_library_waits_for_no_one_either(files, tmp_path, held):
    from mishield import HardenConfig, harden, train_eval_model

    out = tmp_path / "m.pt"
    held(out)
    with pytest.raises(UsageError, match="another mishield run is writing"):
        harden(files["good"], config=HardenConfig(), out=out, load_options={"arch": "attack_support:tiny_resnet"})
    with pytest.raises(UsageError, match="another mishield run is writing"):
        train_eval_model(files["data"], out)
    assert not out.exists()


def test_the_lock_is_released_at_the_end_and_when_the_holder_dies(tmp_path, held):
    out = tmp_path / "m.pt"
    with output_lock(out), output_lock(out):  # re-entrant in one process (harden --search hardens into its own out)
        assert lock_path_for(out).exists()
    assert not lock_path_for(out).exists()
    holder = held(out)
    holder.send_signal(signal.SIGKILL)  # a kill -9 leaves the file, but the kernel drops the lock
    holder.wait()
    with output_lock(out):
        pass


# --------------------------------------------------------------------------- report folders


def test_a_report_folder_appears_whole_or_not_at_all(tmp_path):
    report = tmp_path / "report"
    with pytest.raises(RuntimeError), staged_folder(report, last="report.json") as staging:
        (staging / "grids").mkdir()
        (staging / "grids" / "a.png").write_bytes(b"png")
        raise RuntimeError("the attack failed half way")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary sibling
    with staged_folder(report, last="report.json") as staging:
        (staging / "report.json").write_text("{}")
        assert not report.exists()  # nothing is visible until the block ends
    assert (report / "report.json").read_text() == "{}" and [p.name for p in tmp_path.iterdir()] == ["report"]


def test_an_existing_report_folder_gets_the_new_files_and_keeps_the_others(tmp_path):
    report = tmp_path / "report"
    report.mkdir()
    (report / "notes.txt").write_text("mine")
    (report / "report.json").write_text("old")
    moved = []
    with staged_folder(report, overwrite=True, last="report.json") as staging:
        for name in ("report.json", "report.html"):
            (staging / name).write_text("new")
    for name in ("report.json", "report.html"):
        moved.append((report / name).read_text())
    assert moved == ["new", "new"] and (report / "notes.txt").read_text() == "mine"
    with pytest.raises(UsageError, match="already exists"), staged_folder(report, last="report.json") as staging:
        (staging / "report.json").write_text("newer")  # without overwrite an existing report is kept
    assert (report / "report.json").read_text() == "new"


# --------------------------------------------------------------------------- torchrun's environment


def test_only_the_complete_torchrun_environment_means_torchrun():
    assert torchrun_launch({}) == Launch()
    assert torchrun_launch({**TORCHRUN, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == Launch(1, 2, 1)
    with pytest.raises(UsageError, match="RANK=1 but not WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT"):
        torchrun_launch({"RANK": "1"})
    with pytest.raises(UsageError, match="below the world size"):
        torchrun_launch({**TORCHRUN, "RANK": "1"})
    with pytest.raises(UsageError, match="WORLD_SIZE='two'"):
        torchrun_launch({**TORCHRUN, "WORLD_SIZE": "two"})


@pytest.mark.parametrize("command", ["harden --data", "train-eval", "audit"])
def test_a_stray_rank_is_a_usage_error_not_a_silent_exit_0(command, files, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    out = tmp_path / ("report" if command == "audit" else "out.pt")
    code, _, err = run([*COMMANDS[command](files), "--out", out], capsys)
    assert code == 2, err
    _one_sentence(err)
    assert "partial torchrun environment" in err and not out.exists()


def test_a_stray_rank_stops_the_library_and_the_runtime(files, tmp_path, monkeypatch):
    from mishield import HardenConfig, harden
    from mishield.runtime import make_runtime

    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(UsageError, match="partial torchrun environment"):
        make_runtime("cpu")
    with pytest.raises(UsageError, match="partial torchrun environment"):
        harden(files["good"], config=HardenConfig(epochs=1, device="cpu"), data=files["data"], out=tmp_path / "m.pt",
               load_options={"arch": "attack_support:tiny_resnet", "num_classes": 3})
    assert not (tmp_path / "m.pt").exists()
