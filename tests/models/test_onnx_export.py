"""ONNX export: the written file is valid, self-describing, and computes what the model computes.

Parity is checked independently of the exporter's own check: each test runs onnxruntime on
fresh inputs at batch sizes the export never saw (1, 3, 5) and compares with PyTorch.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
from torch import nn

import mishield
from mishield.errors import BadInputError, ParityError, UsageError
from mishield.onnx_export import OPSET, export_onnx

SMALL = (3, 16, 16)


class TinyResNet(nn.Module):
    """Stem, one identity-skip block, one projection-skip block, classifier."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block1 = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        )
        self.block2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16))
        self.shortcut2 = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.block1(x))
        x = torch.relu(self.block2(x) + self.shortcut2(x))
        return self.fc(x.mean((2, 3)))


def tiny_model(seed: int = 0) -> TinyResNet:
    torch.manual_seed(seed)
    model = TinyResNet()
    # Non-trivial BN statistics, so eval-mode export is actually tested.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def assert_onnx_matches(model: nn.Module, path, input_size, batches=(1, 3, 5), atol=1e-4):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(123)
    for batch in batches:
        x = torch.randn((batch, *input_size), generator=generator)
        with torch.no_grad():
            expected = model(x).numpy()
        (got,) = session.run(["logits"], {"input": x.numpy()})
        assert got.shape == expected.shape == (batch, 10)
        assert np.abs(got - expected).max() <= atol, f"batch {batch}"
        assert (got.argmax(1) == expected.argmax(1)).all(), f"batch {batch}"


def only_file(directory):
    """The directory holds exactly one file: no external-data side files, no leftover temp files."""
    files = sorted(p.name for p in directory.iterdir())
    assert len(files) == 1, files
    return directory / files[0]


# --- a real model: torchvision resnet18 -----------------------------------------------------


@pytest.fixture(scope="module")
def resnet18_export(tmp_path_factory):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    model.train()  # export must switch to eval itself and restore the caller's mode
    out = tmp_path_factory.mktemp("r18") / "resnet18.onnx"
    preprocessing = {"input_size": [3, 64, 64], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    report = export_onnx(
        model,
        out,
        input_size=(3, 64, 64),
        metadata={"arch": "torchvision:resnet18", "preprocessing": json.dumps(preprocessing), "num_classes": 10},
    )
    return model, out, report, preprocessing


def test_resnet18_file_is_one_valid_onnx_file(resnet18_export):
    model, out, report, _ = resnet18_export
    assert only_file(out.parent) == out
    assert report.path == out and report.file_bytes == out.stat().st_size
    assert report.opset == OPSET and report.dynamic_batch and report.exporter == "dynamo"
    assert report.top1_agreement == 1.0 and 0 <= report.max_abs_diff <= 1e-4 and report.probe_batch == 3
    print(f"resnet18 3x64x64 export + checks: {report.seconds:.1f} s")

    onnx.checker.check_model(str(out), full_check=True)
    proto = onnx.load(str(out), load_external_data=False)
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].HasField("dim_value")  # symbolic batch
    assert [d.dim_value for d in dims[1:]] == [3, 64, 64]
    assert model.training  # the caller's mode is restored


def test_resnet18_metadata(resnet18_export):
    _, out, _, preprocessing = resnet18_export
    props = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    assert props["mishield_version"] == mishield.__version__
    assert props["arch"] == "torchvision:resnet18"
    assert json.loads(props["preprocessing"]) == preprocessing
    assert props["num_classes"] == "10"  # non-string values are stored as JSON


def test_resnet18_dynamic_batch_matches_pytorch(resnet18_export):
    model, out, _, _ = resnet18_export
    assert_onnx_matches(model.eval(), out, (3, 64, 64))


# --- other kinds of module ------------------------------------------------------------------


def test_fx_graph_module(tmp_path):
    model = tiny_model()
    traced = torch.fx.symbolic_trace(model)
    report = export_onnx(traced, tmp_path / "fx.onnx", input_size=SMALL)
    assert report.dynamic_batch and report.exporter == "dynamo"
    assert_onnx_matches(model, tmp_path / "fx.onnx", SMALL)


def test_torchscript_module(tmp_path):
    model = tiny_model()
    torch.jit.script(model).save(str(tmp_path / "tiny.ts"))
    scripted = torch.jit.load(str(tmp_path / "tiny.ts"))
    out = tmp_path / "out" / "ts.onnx"
    report = export_onnx(scripted, out, input_size=SMALL)
    # torch's dynamo exporter refuses ScriptModules; they go through torch's TorchScript converter.
    assert report.exporter == "dynamo (TorchScript converted)" and report.dynamic_batch
    assert only_file(out.parent) == out
    assert_onnx_matches(model, out, SMALL)


def test_torchscript_falls_back_to_legacy_exporter(tmp_path, monkeypatch):
    from torch._export import converter

    def broken(*args, **kwargs):
        raise RuntimeError("converter cannot handle this module")

    monkeypatch.setattr(converter, "TS2EPConverter", broken)
    model = tiny_model()
    traced = torch.jit.trace(model, torch.randn(2, *SMALL))
    report = export_onnx(traced, tmp_path / "legacy.onnx", input_size=SMALL, metadata={"arch": "x"})
    assert report.exporter == "torchscript" and report.dynamic_batch
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "legacy.onnx")).metadata_props}
    assert props["arch"] == "x" and props["mishield_version"] == mishield.__version__
    assert_onnx_matches(model, tmp_path / "legacy.onnx", SMALL)


def test_exported_program_module(tmp_path):
    model = tiny_model()
    program = torch.export.export(model, (torch.randn(2, *SMALL),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, tmp_path / "tiny.pt2")
    loaded = torch.export.load(tmp_path / "tiny.pt2").module()
    report = export_onnx(loaded, tmp_path / "ep.onnx", input_size=SMALL)
    assert report.dynamic_batch
    assert_onnx_matches(model, tmp_path / "ep.onnx", SMALL)


def test_exported_program_with_fixed_batch(tmp_path):
    model = tiny_model()
    program = torch.export.export(model, (torch.randn(1, *SMALL),))  # batch 1: specialised
    with pytest.raises(BadInputError, match="`input_size` 16"):
        export_onnx(program, tmp_path / "wrong.onnx", input_size=(3, 32, 32))
    report = export_onnx(program, tmp_path / "fixed.onnx", input_size=SMALL)
    assert not report.dynamic_batch and report.probe_batch == 1
    dims = onnx.load(str(tmp_path / "fixed.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_value == 1
    assert_onnx_matches(model, tmp_path / "fixed.onnx", SMALL, batches=(1,))


# --- refusals and failures ------------------------------------------------------------------


def test_existing_file_refused_before_export(tmp_path, monkeypatch):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"precious")

    def must_not_run(*args, **kwargs):
        raise AssertionError("export ran although the destination exists")

    with monkeypatch.context() as patch:
        patch.setattr(torch.onnx, "export", must_not_run)
        with pytest.raises(UsageError, match="--overwrite"):
            export_onnx(tiny_model(), out, input_size=SMALL)
    assert out.read_bytes() == b"precious"

    export_onnx(tiny_model(), out, input_size=SMALL, overwrite=True)
    onnx.checker.check_model(str(out), full_check=True)
    assert only_file(tmp_path) == out


def test_parity_failure_on_float_noise_with_atol_zero(tmp_path):
    out = tmp_path / "m.onnx"
    with pytest.raises(ParityError) as info:
        export_onnx(tiny_model(), out, input_size=SMALL, atol=0.0)
    assert info.value.exit_code == 5
    diff = float(info.value.args[0].split("max abs logit diff ")[1].split(",")[0])
    assert diff > 0  # a real measured difference, not a forced failure
    assert not out.exists() and list(tmp_path.iterdir()) == []


class ExportSensitive(TinyResNet):
    """Computes something else when traced for export: the class order is reversed."""

    def forward(self, x):
        logits = super().forward(x)
        return logits.flip(-1) if torch.compiler.is_exporting() else logits


def test_parity_failure_on_wrong_graph(tmp_path):
    model = ExportSensitive()
    model.load_state_dict(tiny_model().state_dict())
    out = tmp_path / "m.onnx"
    out.write_bytes(b"old")
    with pytest.raises(ParityError, match="top-1 agreement 0%"):
        export_onnx(model, out, input_size=SMALL, overwrite=True)
    assert out.read_bytes() == b"old"  # the failed export did not replace it
    assert only_file(tmp_path) == out


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # torch.export cannot trace a branch on tensor values
            return x.mean((2, 3)).repeat(1, 4)[:, :10]
        return x.amax((2, 3)).repeat(1, 4)[:, :10]


def test_export_failure_is_one_sentence(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MISHIELD_DEBUG", raising=False)
    out = tmp_path / "m.onnx"
    with pytest.raises(BadInputError) as info:
        export_onnx(DataDependent(), out, input_size=SMALL)
    message = str(info.value)
    assert "\n" not in message and "MISHIELD_DEBUG=1" in message
    assert message.startswith("ONNX export failed (") and "data-dependent" in message
    assert not out.exists()
    captured = capsys.readouterr()
    assert captured.out == ""  # the exporter's chatter never reaches stdout (--json)


def test_wrong_input_size_fails_before_export(tmp_path):
    with pytest.raises(BadInputError, match="check `input_size`"):
        export_onnx(nn.Linear(10, 10), tmp_path / "m.onnx", input_size=SMALL)
    assert list(tmp_path.iterdir()) == []


# --- command line ---------------------------------------------------------------------------


def run_cli(args, capsys):
    from mishield.cli import main

    try:
        main(args)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_json(tmp_path, capsys):
    out = tmp_path / "r18.onnx"
    args = ["export", "torchvision:resnet18", "--num-classes", "10", "--input-size", "32", "--out", str(out), "--json"]
    code, stdout, stderr = run_cli(args, capsys)
    assert code == 0, stderr
    doc = json.loads(stdout)  # one JSON document and nothing else
    assert doc["path"] == str(out) and doc["file_bytes"] == out.stat().st_size
    assert doc["top1_agreement"] == 1.0 and doc["max_abs_diff"] <= 1e-4 and doc["dynamic_batch"]
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["arch"] == "torchvision:resnet18"
    assert json.loads(props["preprocessing"])["input_size"] == [3, 32, 32]
    assert props["mishield_version"] == mishield.__version__

    code, stdout, stderr = run_cli(args, capsys)  # now it exists
    assert code == 2 and stdout == "" and "--overwrite" in stderr


def test_cli_summary_and_parity_exit_code(tmp_path, capsys):
    model = tiny_model()
    torch.jit.script(model).save(str(tmp_path / "tiny.ts"))
    out = tmp_path / "tiny.onnx"
    code, stdout, stderr = run_cli(["export", str(tmp_path / "tiny.ts"), "--trust-checkpoint", "--input-size", "16", "--out", str(out)], capsys)
    assert code == 0, stderr
    assert stdout == ""
    assert "tiny.onnx" in stderr and "top-1 agreement 100%" in stderr and "opset 20" in stderr
    assert_onnx_matches(model, out, SMALL)

    good = out.read_bytes()
    args = ["export", str(tmp_path / "tiny.ts"), "--trust-checkpoint", "--input-size", "16", "--out", str(out), "--overwrite", "--atol", "0"]
    code, stdout, stderr = run_cli(args, capsys)
    assert code == 5, stderr
    assert "max abs logit diff" in stderr and "Traceback" not in stderr and stdout == ""
    assert out.read_bytes() == good  # the failed export left the earlier file alone
