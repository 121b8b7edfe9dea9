"""`mishield audit`, `prior train` and `train-eval` on the command line: exit codes and messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from attack_support import noise_splits

from mishield.cli import main


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """Three classes of random 20x20 greyscale images (train/ and val/)."""
    return noise_splits(tmp_path_factory.mktemp("tiny"), train=6, val=2, size=20)


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    out, err = capsys.readouterr()
    return code, out, err


def _audit(tiny_data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "audit", "attack_support:tiny_resnet", "--num-classes", "3", "--input-size", "16", "--data", str(tiny_data),
        "--out", str(out), "--device", "cpu", "-S", "8", "-C", "2", "-I", "1", "-K", "1", "-A", "1", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "code", "needle"),
    [
        ([], 2, "mishield train-eval"),
        (["--eval-model", "attack_support:small_plain_cnn"], 2, "mishield prior train"),
        (["--eval-model", "x", "--prior", "none", "--max-attack-acc", "40"], 2, "fraction"),
        (["--eval-model", "attack_support:small_plain_cnn", "--prior", "none", "--classes", "0-9,17"], 3, "unknown class ids"),
        (["--eval-model", "attack_support:small_plain_cnn", "--prior", "attack_support:generator_0_255"], 3, "[-1, 1]"),
        (["--eval-model", "attack_support:small_plain_cnn", "--prior", "attack_support:generator_flat"], 3, "(N, C, H, W)"),
        (["--eval-model", "attack_support:small_plain_cnn", "--prior", "none"], 3, "evaluation model"),  # 10 classes vs 3
        (["--eval-model", "attack_support:small_plain_cnn", "--prior", "none", "-C", "9"], 2, "cannot exceed"),
    ],
)
def test_bad_audit_input_is_one_sentence_and_an_exit_code(tiny_data, tmp_path, capsys, extra, code, needle):
    got, out, err = _run(_audit(tiny_data, tmp_path / "out", *extra), capsys)
    assert got == code, err
    assert needle in err and "Traceback" not in err and out == ""
    assert not (tmp_path / "out" / "report.json").exists()


def test_empty_or_mismatched_data_is_bad_input(tiny_data, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    args = ["--eval-model", "attack_support:small_plain_cnn", "--prior", "none"]
    code, _, err = _run(_audit(tmp_path / "empty", tmp_path / "out", *args), capsys)
    assert code == 3 and "class sub-folders" in err
    code, _, err = _run(_audit(tiny_data / "train", tmp_path / "out", *args, "--num-classes", "4"), capsys)
    assert code == 3 and "class folders" in err


def test_an_existing_report_is_not_overwritten(tiny_data, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "report.json").write_text("{}")
    code, _, err = _run(_audit(tiny_data, tmp_path / "out", "--eval-model", "e", "--prior", "none"), capsys)
    assert code == 2 and "--overwrite" in err
    assert (tmp_path / "out" / "report.json").read_text() == "{}"


def test_prior_train_and_train_eval_write_loadable_files(tiny_data, tmp_path, capsys):
    prior = tmp_path / "prior.safetensors"
    code, out, _ = _run(
        ["prior", "train", "--data", str(tiny_data), "--out", str(prior), "--resolution", "32", "--width", "4",
         "--latent-dim", "8", "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--json"], capsys,
    )  # fmt: skip
    assert code == 0
    summary = json.loads(out)
    assert summary["resolution"] == 32 and summary["channels"] == 1 and summary["training"]["images"] == 24
    eval_file = tmp_path / "eval.pt"
    code, out, _ = _run(
        ["train-eval", "--data", str(tiny_data), "--out", str(eval_file), "--arch", "attack_support:small_plain_cnn",
         "--input-size", "16", "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--json"], capsys,
    )  # fmt: skip
    assert code == 0
    assert json.loads(out)["classes"] == ["a", "b", "c"]
    from mishield.models import load_model

    loaded = load_model(eval_file, arch="attack_support:small_plain_cnn")
    assert loaded.num_classes == 3 and loaded.preprocessing.input_size == (3, 16, 16)
    assert loaded.recipe["training"]["role"] == "evaluation"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_audit_runs_on_cuda_with_bf16_channels_last_and_compile(tiny_data, tmp_path, capsys):
    from mishield.attack.priors import DCGANGenerator, save_generator
    from mishield.training.evaluator import train_eval_model

    prior = save_generator(tmp_path / "prior.safetensors", DCGANGenerator(16, 32, 1, 8).eval(), {})
    eval_file = tmp_path / "eval.pt"
    train_eval_model(tiny_data, eval_file, arch="attack_support:small_plain_cnn", input_size=16, epochs=1, batch_size=8, device="cuda")
    args = _audit(tiny_data, tmp_path / "out", "--eval-model", str(eval_file), "--eval-arch", "attack_support:small_plain_cnn",
                  "--prior", str(prior), "--compile", "--json")  # fmt: skip
    args[args.index("--device") + 1] = "cuda"
    code, out, err = _run(args, capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["options"]["bf16"] and report["options"]["channels_last"] and report["options"]["compile"]
    assert report["options"]["device"].startswith("cuda") and report["models"][0]["metrics"]["n"] == 3


def test_gate_advice_follows_the_cause_the_audit_found(tmp_path):
    from mishield.audit.results import AuditReport, ModelAudit, PrivacyGate
    from mishield.cli.audit_cmd import gate_message

    def report(*verdicts, warnings=()):
        models = [ModelAudit(name=f"m{i}", metrics={}, verdict=v) for i, v in enumerate(verdicts)]
        failing = [m.name for m in models if not m.verdict["passed"]]
        inconclusive = [m.name for m in models if m.verdict["status"] == "inconclusive"]
        gate = PrivacyGate(0.5, not failing, failing, inconclusive, {m.name: m.verdict["reason"] for m in models})
        return AuditReport(models=models, classes=[0, 1], options={}, prior={}, eval_model={}, gate=gate, warnings=list(warnings))

    unreached = {"status": "inconclusive", "passed": False, "reason": "the attack did not reach ...", "cause": "unreached"}
    leaky = {"status": "leaky", "passed": False, "reason": "attack accuracy 80 % exceeds", "cause": "leaky"}
    uncertain = {"status": "leaky", "passed": False, "reason": "the upper end is not", "cause": "uncertain"}
    passes = {"status": "passes", "passed": True, "reason": "ok", "cause": "passes"}
    html = tmp_path / "report.html"
    said = gate_message(report(passes, unreached, warnings=["the prior looks too weak for a meaningful audit"]), html)
    assert "raise the budget" in said and "prior too weak" in said and "harden it" not in said
    assert "harden it" in gate_message(report(leaky), html) and "raise the budget" not in gate_message(report(leaky), html)
    said = gate_message(report(uncertain), html)
    assert "audit more classes" in said and "harden it" not in said
