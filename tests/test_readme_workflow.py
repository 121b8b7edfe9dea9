"""The README's "On your own checkpoint" block runs as written: a plain state dict, plain
ImageFolders, each command as the README shows it plus only size options the CLI documents."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from clirun import run_cli

README = Path(__file__).resolve().parents[1] / "README.md"

# Size options appended to each README command so the run fits a test (all documented in --help).
SMALL = {
    "harden": ["--epochs", "2", "--batch-size", "32", "--lr", "0.003", "--device", "cpu"],
    "prior": ["--epochs", "2", "--width", "8", "--latent-dim", "16", "--device", "cpu"],
    "train-eval": ["--epochs", "8", "--batch-size", "32", "--lr", "0.003", "--device", "cpu"],
    "audit": ["--preset", "ci", "--allow-weak-budget", "--device", "cpu"],
}


def readme_workflow() -> list[list[str]]:
    text = README.read_text()
    section = text[text.index("## On your own checkpoint"):]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)
    return [shlex.split(line.split("  #")[0]) for line in block.splitlines() if line.strip()]


def test_the_block_is_the_whole_pipeline():
    commands = [c[1] for c in readme_workflow()]
    assert commands == ["inspect", "harden", "prior", "train-eval", "train-eval", "audit", "export"]
    # two evaluation models of different architectures, both given to the audit
    evals = [c for c in readme_workflow() if c[1] == "train-eval"]
    assert [c[c.index("--out") + 1] for c in evals] == ["eval.pt", "eval2.pt"] and "--arch" in evals[1]
    audit = next(c for c in readme_workflow() if c[1] == "audit")
    assert [audit[i + 1] for i, a in enumerate(audit) if a == "--eval-model"] == ["eval.pt", "eval2.pt"]


@pytest.mark.slow
def test_readme_workflow_runs_as_written(tmp_path, monkeypatch, capsys):
    """About a minute on 2 idle cores."""
    import torchvision

    from mishield.data import load_image_folders, materialize_fashion_mnist
    from mishield.models import load_model
    from mishield.training import fit

    monkeypatch.chdir(tmp_path)
    # The user's data: private classes with a val/ split, public classes the target never saw.
    materialize_fashion_mnist(tmp_path / "private", [0, 1, 7], train_per_class=100, val_per_class=30)
    materialize_fashion_mnist(tmp_path / "public", [5, 6, 8], train_per_class=100, val_per_class=1)
    # The user's checkpoint: a plain state dict, trained a little so the audit has something to find.
    torch.manual_seed(0)
    loaded = load_model("torchvision:resnet18", num_classes=3, input_size=32)
    fit(loaded.model, load_image_folders(tmp_path / "private"), loaded.preprocessing, epochs=3, lr=3e-3,
        batch_size=32, device="cpu", workers=0)
    torch.save(loaded.model.state_dict(), tmp_path / "model.pt")
    assert isinstance(torchvision.models.resnet18(num_classes=3).load_state_dict(torch.load(tmp_path / "model.pt")), object)

    for argv in readme_workflow():
        name = argv[1]
        code, out, err = run_cli(argv[1:] + SMALL.get(name, []), capsys)
        # the audit's gate is a decision (0 passes, 4 blocks); every other step must succeed
        assert code in ((0, 4) if name == "audit" else (0,)), f"{' '.join(argv)} -> {code}: {err[-1500:]}"
        if name == "inspect":
            assert "layer4" in out  # the table goes to stdout, so `> skips.txt` keeps it
    assert Path("hardened.pt").is_file() and Path("hardened.onnx").is_file()
    assert Path("audit/report.json").is_file()
    report = json.loads(Path("audit/report.json").read_text())
    assert [e["source"] for e in report["eval_models"]] == ["eval.pt", "eval2.pt"]
    # the prior train keeps its discriminator: the audit reads the reconstructions in a public-only space too
    assert [e["kind"] for e in report["feature_extractors"]] == ["public", "evaluator"]
    # a plain state dict says nothing about its resolution: harden took the data's (28 px -> 32)
    assert load_model("hardened.pt").preprocessing.input_size[1:] == (32, 32)
