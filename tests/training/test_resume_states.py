"""`--resume` with a state a real interrupted run left, then damaged or from a newer mishield.

Both must stop before any training with exit 3 and one sentence; the untouched state must still
resume, so the refusals are about the damage and not about resuming in general.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from attack_support import noise_image_folder, tiny_resnet
from clirun import run_cli as run

from mishield.data import load_image_folders
from mishield.errors import BadInputError
from mishield.preprocessing import Preprocessing
from mishield.training import STATE_VERSION, TrainingInterrupted, fit, load_state

ARCH = ["--arch", "attack_support:tiny_resnet", "--num-classes", "3", "--input-size", "16"]
PRE = Preprocessing((3, 16, 16), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> dict[str, Path]:
    """A model file, an ImageFolder, and the state of a 2-epoch run stopped after epoch 1."""
    root = tmp_path_factory.mktemp("resume")
    noise_image_folder(root / "data", per_class=6)
    torch.manual_seed(0)
    torch.save(tiny_resnet(num_classes=3).state_dict(), root / "good.pt")
    state = root / "run.train-state"
    with pytest.raises(TrainingInterrupted):
        _fit(root, state, stop_after=1)
    assert load_state(state)["epoch"] == 1
    return {"root": root, "state": state}


def _fit(root: Path, state: Path, **kw):
    torch.manual_seed(0)
    splits = load_image_folders(root / "data", val_fraction=0.34, seed=0)
    return fit(tiny_resnet(num_classes=3), splits, PRE, epochs=2, batch_size=4, device="cpu", workers=0,
               seed=0, state_path=state, **kw)  # fmt: skip


def _truncated(src: Path, dst: Path) -> None:
    dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])


def _newer(src: Path, dst: Path) -> None:
    state = torch.load(src, map_location="cpu", weights_only=True)
    state["version"] = STATE_VERSION + 1
    torch.save(state, dst)


TAMPER = {"truncated": (_truncated, "not a readable training state"), "newer": (_newer, "newer mishield")}


@pytest.mark.parametrize("kind", list(TAMPER))
def test_library_resume_refuses_a_damaged_or_newer_state(interrupted, tmp_path, kind):
    tamper, words = TAMPER[kind]
    state = tmp_path / "run.train-state"
    tamper(interrupted["state"], state)
    with pytest.raises(BadInputError, match=words) as info:
        _fit(interrupted["root"], state, resume=True)
    assert info.value.exit_code == 3


@pytest.mark.parametrize("kind", list(TAMPER))
def test_cli_resume_with_a_damaged_or_newer_state_is_exit_3(interrupted, tmp_path, capsys, kind):
    tamper, words = TAMPER[kind]
    out = tmp_path / "h.pt"
    tamper(interrupted["state"], tmp_path / "h.pt.train-state")
    argv = ["harden", interrupted["root"] / "good.pt", *ARCH, "--data", interrupted["root"] / "data",
            "--val-fraction", "0.34", "--epochs", "2", "--batch-size", "4", "--workers", "0", "--resume",
            "--out", out, "--device", "cpu"]  # fmt: skip
    code, _, err = run(argv, capsys)
    assert code == 3, err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("warning: ")]  # warnings may come first
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err
    assert "Traceback" not in err and not out.exists()
    assert (tmp_path / "h.pt.train-state").exists()  # the evidence is left for the user


def test_the_untouched_state_still_resumes(interrupted, tmp_path):
    state = tmp_path / "run.train-state"
    shutil.copy(interrupted["state"], state)
    result = _fit(interrupted["root"], state, resume=True)
    assert result.resumed_from_epoch == 1 and [h["epoch"] for h in result.history] == [1, 2]
