"""Each command's interruption message names what that command accepts: `--resume` where the
command has it, a plain rerun for the demo (which has none)."""

from __future__ import annotations

from clirun import run_cli

from mishield import demo
from mishield.training import evaluator
from mishield.training.interrupt import interrupted


def _stopped(state):
    def stop(*args, **kwargs):
        raise interrupted(KeyboardInterrupt(), "train epoch 2", state)

    return stop


def test_train_eval_interruption_names_the_resume_flag(tmp_path, capsys, monkeypatch):
    state = tmp_path / "eval.pt.train-state"
    state.write_bytes(b"saved")
    monkeypatch.setattr(evaluator, "train_eval_model", _stopped(state))
    code, _, err = run_cli(["train-eval", "--data", tmp_path, "--out", tmp_path / "eval.pt"], capsys)
    assert code == 130
    assert "rerun the same command with --resume to continue" in err and "`resume`" not in err


def test_demo_interruption_says_a_plain_rerun_continues(tmp_path, capsys, monkeypatch):
    state = tmp_path / "x.train-state"
    state.write_bytes(b"saved")
    monkeypatch.setattr(demo, "_train_target", _stopped(state))
    code, _, err = run_cli(["demo", "--quick", "--out", tmp_path / "d", "--device", "cpu"], capsys)
    assert code == 130
    assert "the demo was stopped in stage 2/" in err and "target" in err
    assert "rerun the same command: the finished stages are kept" in err
    assert "resume" not in err
