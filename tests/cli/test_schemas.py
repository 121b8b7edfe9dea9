"""The `--json` pipeline contract (docs/pipelines.md): every command prints exactly one JSON
document on stdout, and that document validates against the versioned schema shipped in
`mishield/schemas/`. The documents here are real output of the commands on the embedded
Fashion-MNIST data with test-sized models and budgets."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema (dev extra) validates the documents")

from clirun import run_cli

from mishield.schemas import COMMANDS, load_schema

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--num-classes", "3", "--input-size", "32"]
RESNET = "torchvision:resnet18"


def validate(command: str, stdout: str) -> dict:
    """Parse stdout as ONE JSON document (json.loads rejects trailing output) and validate it."""
    document = json.loads(stdout)
    validator = jsonschema.Draft202012Validator(load_schema(command), format_checker=jsonschema.FormatChecker())
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]
    assert not errors, errors
    return document


@pytest.fixture(scope="module")
def private(tmp_path_factory) -> Path:
    """Three private classes, 20 train + 5 val images each."""
    from mishield.data import materialize_fashion_mnist

    return materialize_fashion_mnist(tmp_path_factory.mktemp("private"), [0, 1, 2], train_per_class=20, val_per_class=5)


@pytest.fixture(scope="module")
def public(tmp_path_factory) -> Path:
    """Classes the target never saw, as the attacker's public data for the prior."""
    from mishield.data import materialize_fashion_mnist

    return materialize_fashion_mnist(tmp_path_factory.mktemp("public"), [5, 6, 7], train_per_class=16, val_per_class=1)


def test_every_command_has_a_valid_versioned_schema_shipped_as_package_data():
    files = sorted(p.name for p in (ROOT / "mishield" / "schemas").glob("*.schema.json"))
    assert files == sorted(f"{c}.schema.json" for c in COMMANDS)
    for command in COMMANDS:
        schema = load_schema(command)
        jsonschema.Draft202012Validator.check_schema(schema)
        assert re.fullmatch(rf"https://mishield\.dev/schemas/{re.escape(command)}/[1-9][0-9]*", schema["$id"])
        assert schema["type"] == "object" and schema["required"]
        # Growing a report must not break consumers: no schema closes its top-level object.
        assert schema.get("additionalProperties", True) is not False
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["mishield"]
    assert "schemas/*.json" in package_data


def test_inspect(capsys):
    code, out, err = run_cli(["inspect", RESNET, *SMALL, "--json"], capsys)
    assert code == 0, err
    doc = validate("inspect", out)
    assert doc["selected"] == ["layer4.0.add", "layer4.1.add"]


def test_harden_surgery_only_and_missing_keys_are_rejected(tmp_path, capsys):
    code, out, err = run_cli(["harden", RESNET, *SMALL, "--out", tmp_path / "h.pt", "--json"], capsys)
    assert code == 0, err
    doc = validate("harden", out)
    assert doc["method"] == "rolss" and "log" not in doc
    # The schema is not vacuous: dropping a required key fails validation.
    del doc["sites"]
    with pytest.raises(AssertionError, match="'sites' is a required property"):
        validate("harden", json.dumps(doc))


def test_harden_with_training(private, tmp_path, capsys):
    args = ["harden", RESNET, *SMALL, "--out", tmp_path / "h.pt", "--data", private, "--epochs", "1",
            "--stage1-epochs", "0", "--batch-size", "20", "--device", "cpu", "--json"]  # fmt: skip
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    doc = validate("harden", out)
    assert doc["train_images"] == 60 and len(doc["epochs"]) == 1
    # With a training log, the training record is required (dependentRequired in the schema).
    del doc["metrics"]
    with pytest.raises(AssertionError, match="'metrics' is a dependency of 'log'"):
        validate("harden", json.dumps(doc))


def test_export(tmp_path, capsys):
    code, out, err = run_cli(["export", "attack_support:tiny_resnet", *SMALL, "--out", tmp_path / "m.onnx", "--json"], capsys)
    assert code == 0, err
    doc = validate("export", out)
    assert Path(doc["path"]).stat().st_size == doc["file_bytes"]


def test_prior_train(public, tmp_path, capsys):
    args = ["prior", "train", "--data", public, "--out", tmp_path / "p.safetensors", "--resolution", "32",
            "--width", "4", "--latent-dim", "8", "--epochs", "1", "--batch-size", "16", "--device", "cpu", "--json"]  # fmt: skip
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    assert validate("prior-train", out)["training"]["images"] == 3 * (16 + 1)  # a prior uses train/ and val/


def test_train_eval(private, tmp_path, capsys):
    args = ["train-eval", "--data", private, "--out", tmp_path / "e.pt", "--arch", "attack_support:small_plain_cnn",
            "--input-size", "32", "--epochs", "1", "--batch-size", "20", "--device", "cpu", "--json"]  # fmt: skip
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    assert validate("train-eval", out)["classes"] == ["0_tshirt_top", "1_trouser", "2_pullover"]


def test_surrogate_train(private, public, tmp_path, capsys):
    from mishield.models import build_architecture, save_model
    from mishield.preprocessing import Preprocessing

    target = save_model(tmp_path / "t.pt", build_architecture(RESNET, 3).eval(), arch=RESNET, num_classes=3, surgery=None,
                        preprocessing=Preprocessing((3, 32, 32)))  # fmt: skip
    args = ["surrogate", "train", target, "--public", public, "--out", tmp_path / "s.pt", "--surrogate-arch", "attack_support:tiny_resnet",
            "--epochs", "1", "--batch-size", "16", "--device", "cpu", "--json"]  # fmt: skip
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    doc = validate("surrogate-train", out)
    assert doc["agreement_n"] == 5 and doc["public_images"] == 46 and doc["input_size"] == [3, 32, 32]
    del doc["target_sha256"]
    with pytest.raises(AssertionError, match="'target_sha256' is a required property"):
        validate("surrogate-train", json.dumps(doc))


def test_audit_at_the_smallest_budget(private, public, tmp_path, capsys):
    from mishield.attack.priors import DCGANGenerator, save_generator
    from mishield.models.dcgan import DCGANDiscriminator
    from mishield.training.evaluator import train_eval_model

    # a prior file with its discriminator (format 2): the audit's public feature space
    prior = save_generator(tmp_path / "prior.safetensors", DCGANGenerator(latent_dim=8, resolution=32, channels=1, width=4).eval(), {},
                           discriminator=DCGANDiscriminator(32, 1, 4))  # fmt: skip
    evaluation = tmp_path / "eval.pt"
    train_eval_model(private, evaluation, arch="attack_support:small_plain_cnn", input_size=32, epochs=1,
                     batch_size=20, device="cpu")  # fmt: skip
    args = ["audit", RESNET, "attack_support:tiny_resnet", *SMALL, "--data", private, "--out", tmp_path / "audit",
            "--prior", prior, "--eval-model", evaluation, "--eval-arch", "attack_support:small_plain_cnn",
            "--device", "cpu", "-S", "8", "-C", "1", "-I", "1", "-K", "1", "-A", "1", "--json"]  # fmt: skip
    # A 1-epoch evaluator and untrained targets: refused by the trust checks unless smoke-tested (then ungated).
    code, out, err = run_cli([*args, "--allow-weak-evaluator"], capsys)
    assert code == 0, err
    doc = validate("audit", out)
    assert doc["gate"] is None and len(doc["models"]) == 2
    assert doc["eval_model"]["trust"]["floor"] > 0 and doc["prior"]["quality"]["nn_ratio"] > 0
    assert doc["models"][0]["delta"] is None and isinstance(doc["models"][1]["delta"], dict)
    assert doc["schema_version"] == 2 and [e["kind"] for e in doc["feature_extractors"]] == ["public", "evaluator"]
    for m in doc["models"]:
        assert [e["extractor"] for e in m["metrics"]["feature_extractors"]] == [e["extractor"] for e in doc["feature_extractors"]]
        assert m["metrics"]["knn_judge_extractor"] == doc["feature_extractors"][0]["extractor"]
        assert 0 <= m["metrics"]["knn_judge_acc1"] <= 1 and len(m["per_class"][0]["feature_extractors"]) == 2
    # version 2: the default attacks (ppa and the gradient-free one, its budget in queries) and the masking diagnostics
    assert [r["attack"] for r in doc["models"][0]["attacks"]] == ["ppa", "blackbox"]
    blackbox = doc["models"][0]["attacks"][1]
    assert blackbox["budget"]["queries_per_candidate"] == 8 and blackbox["timing"]["queries"]["per_candidate"] == 8
    assert all(isinstance(m["masking"]["signals"], list) and "gradient_stats" in m["masking"] for m in doc["models"])
    # stdout and report.json carry the same document.
    assert json.loads(Path(doc["files"]["json"]).read_text())["models"] == doc["models"]


def test_env(capsys):
    code, out, err = run_cli(["env", "--json"], capsys)
    assert code == 0, err
    doc = validate("env", out)
    assert doc["embedded_data"]["intact"] is True
