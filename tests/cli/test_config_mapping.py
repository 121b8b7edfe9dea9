"""Each command builds its library configuration from its options in one mapping: every flag must
reach the right field (and nothing else), which these tests pin by capturing the config."""

from __future__ import annotations

import pytest
from clirun import run_cli

from mishield import hardening
from mishield.audit import runner

STOP = 99  # the fake library call stops the command with this exit code once it has seen its arguments


@pytest.fixture
def captured(monkeypatch):
    seen = {}

    def fake(*args, **kwargs):
        seen.update(kwargs, args=args)
        raise SystemExit(STOP)

    monkeypatch.setattr(runner, "audit", fake)
    monkeypatch.setattr(hardening, "harden", fake)
    return seen


def _call(argv, capsys):
    code, _, err = run_cli(argv, capsys)
    assert code == STOP, err


def test_every_audit_flag_reaches_its_config_field(captured, capsys, tmp_path):
    _call(["audit", "a.pt", "b.pt", "--data", tmp_path, "--prior", "p.safetensors", "--eval-model", "e1.pt", "--eval-model", "e2.pt",
           "--attack", "ppa,lomma", "--blackbox-generations", "9", "--surrogate", "s.pt", "--classes", "0-3", "--preset", "ci", "-S", "300", "-C", "12",
           "-I", "7", "-K", "6", "-A", "5", "--batch-size", "33", "--seed", "4", "--seeds", "3", "--val-fraction", "0.2",
           "--lr", "0.02", "--milestones", "0.5,0.7", "--gamma", "0.3", "--center-crop", "0.9", "--no-selection-baseline",
           "--allow-weak-budget", "--device", "cpu", "--compile", "--max-attack-acc", "0.45", "--arch", "timm:test_resnet",
           "--eval-arch", "attack_support:small_plain_cnn", "--num-classes", "4", "--trust-checkpoint", "--input-size", "24",
           "--mean", "0.5", "--std", "0.25", "--overwrite", "--out", tmp_path / "o"], capsys)  # fmt: skip
    c = captured["config"]
    assert captured["args"] == (["a.pt", "b.pt"],) and captured["eval_model"] == ["e1.pt", "e2.pt"]
    assert [str(s) for s in captured["surrogates"]] == ["s.pt"] and captured["prior"] == "p.safetensors"
    a = c.attack
    assert (a.preset, a.samples, a.candidates, a.iterations, a.keep, a.final_augmentations, a.batch_size, a.seed) == \
        ("ci", 300, 12, 7, 6, 5, 33, 4)
    assert (a.lr, a.milestones, a.gamma, a.center_crop, a.selection_baseline, a.compile) == (0.02, (0.5, 0.7), 0.3, 0.9, False, True)
    assert c.attacks == ("ppa", "lomma") and c.classes == "0-3" and c.seeds == 3 and c.val_fraction == 0.2
    assert c.blackbox.generations == 9
    assert c.allow_weak_budget and not c.allow_weak_evaluator and c.max_attack_acc == 0.45 and c.device == "cpu"
    assert c.trust_checkpoint and c.overwrite and c.eval_arch == "attack_support:small_plain_cnn"
    assert c.load_options == {"arch": "timm:test_resnet", "num_classes": 4, "input_size": 24, "mean": (0.5,), "std": (0.25,)}
    assert c.provenance["preset"] == "ci" and c.provenance["eval_models"] == ["e1.pt", "e2.pt"]


def test_audit_defaults_are_the_default_preset(captured, capsys, tmp_path):
    _call(["audit", "a.pt", "--data", tmp_path, "--prior", "none", "--eval-model", "e.pt"], capsys)
    c = captured["config"]
    assert c.attack == mishield_default_attack() and c.attacks is None and c.max_attack_acc is None and c.seeds == 1
    assert c.blackbox.generations is None  # half of the resolved I, decided by the audit with its prior


def mishield_default_attack():
    from mishield.attack.config import make_config

    return make_config("default", seed=0, compile=False, selection_baseline=True)


def test_every_harden_flag_reaches_its_config_field(captured, capsys, tmp_path):
    _call(["harden", "m.pt", "--out", tmp_path / "h.pt", "--method", "ssf", "--alpha", "0.3", "--epochs", "7", "--stage", "-2",
           "--sites", "layer4.*", "--data", tmp_path, "--val-data", tmp_path / "v", "--val-fraction", "0.1", "--schedule", "tts",
           "--stage1-epochs", "2", "--lr", "0.002", "--batch-size", "16", "--bido", "--bido-lx", "0.1", "--bido-ly", "0.7",
           "--resume", "--seed", "5", "--device", "cpu", "--compile", "--reset-head", "--workers", "1", "--overwrite",
           "--arch", "timm:test_resnet", "--num-classes", "3", "--neg-ls", "-0.07", "--neg-ls-start", "3", "--neg-ls-ramp", "2",
           "--erase", "0.9,0.2,0.6", "--freeze-stages", "2", "--public", tmp_path / "pub", "--public-epochs", "4"], capsys)  # fmt: skip
    c = captured["config"]
    assert (c.method, c.alpha, c.epochs, c.stage, c.sites, c.schedule, c.stage1_epochs, c.lr, c.batch_size) == \
        ("ssf", 0.3, 7, -2, ("layer4.*",), "tts", 2, 0.002, 16)
    assert (c.bido, c.bido_lx, c.bido_ly, c.resume, c.seed, c.device, c.compile, c.reset_head, c.workers, c.overwrite) == \
        (True, 0.1, 0.7, True, 5, "cpu", True, True, 1, True)
    assert c.val_fraction == 0.1 and captured["val_data"] == tmp_path / "v" and captured["data"] == tmp_path
    assert captured["load_options"]["arch"] == "timm:test_resnet" and captured["load_options"]["num_classes"] == 3
    assert (c.neg_ls, c.neg_ls_start, c.neg_ls_ramp, c.erase, c.freeze_stages, c.public_epochs) == \
        (-0.07, 3, 2, (0.9, 0.2, 0.6), 2, 4)
    assert captured["public"] == tmp_path / "pub"


def test_harden_defence_defaults_are_off_and_erase_p_alone_takes_midres_areas(captured, capsys, tmp_path):
    _call(["harden", "m.pt", "--out", tmp_path / "h.pt", "--data", tmp_path], capsys)
    c = captured["config"]
    assert (c.neg_ls, c.neg_ls_start, c.neg_ls_ramp, c.erase, c.freeze_stages, c.public_epochs) == (None, None, None, None, 0, None)
    assert captured["public"] is None
    _call(["harden", "m.pt", "--out", tmp_path / "h.pt", "--data", tmp_path, "--erase", "0.5"], capsys)
    assert captured["config"].erase == (0.5, 0.1, 0.8)
