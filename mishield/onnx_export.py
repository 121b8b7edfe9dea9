"""ONNX export that proves itself: the file is kept only if onnxruntime reproduces the model.

docs/architecture.md §7: `torch.onnx.export` on the dynamo path, a dynamic batch axis, one self-contained
file, `onnx.checker` full check, then a parity check against onnxruntime (max abs diff on the
logits <= atol and identical top-1 on a seeded probe batch). The file is written to a temporary
path and renamed into place only after every check passed, so a failed export never leaves a
file that a pipeline could pick up by mistake.

Three kinds of module reach this function besides ordinary eager modules, and each needs care
with torch's exporter:

* TorchScript (`torch.jit.load`): the dynamo exporter refuses ScriptModules outright. We
  convert them to an ExportedProgram with torch's TorchScript converter and export that; if the
  conversion fails we fall back to torch's older TorchScript-based exporter. Both results go
  through the same checker and parity check, so neither is trusted blindly.
* ExportedProgram modules (`torch.export.load(...).module()`): `eval()` raises on them and their
  input shapes are baked into the graph. A program exported with a fixed batch size cannot be
  given a dynamic batch axis afterwards, so it is exported at that batch size and the report
  says so (`dynamic_batch=False`).
* torch.fx GraphModules: ordinary modules as far as the exporter is concerned.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import mishield
from mishield.errors import BadInputError, MishieldError, ParityError
from mishield.fileio import atomic_output, check_writable, output_lock

# torch's dynamo default today and the TorchScript exporter's maximum: both paths emit the same opset.
OPSET = 20
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
# Exporting with batch 1 lets torch.export specialise the batch dimension to a constant.
EXPORT_BATCH = 2
_PROTOBUF_LIMIT = 2**31 - 1
_DEBUG_HINT = "rerun with MISHIELD_DEBUG=1 for the exporter's full report"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class OnnxExportReport:
    path: Path
    opset: int
    max_abs_diff: float
    top1_agreement: float  # fraction of probe images whose top-1 class matches
    probe_batch: int
    file_bytes: int
    seconds: float  # export + checks, wall clock
    exporter: str  # "dynamo", "dynamo (TorchScript converted)" or "torchscript"
    dynamic_batch: bool

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def export_onnx(
    model: nn.Module | torch.export.ExportedProgram,
    out: str | os.PathLike,
    *,
    input_size: tuple[int, int, int],
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
    atol: float = 1e-4,
    probe_batch: int = 3,
    seed: int = 0,
) -> OnnxExportReport:
    """Export `model` (N, C, H, W) -> (N, classes) logits to one verified ONNX file at `out`.

    `metadata` goes into the ONNX `metadata_props`; values that are not strings are stored as
    JSON. "mishield_version" is always set. Raises UsageError when `out` exists without
    `overwrite`, BadInputError when the model cannot be exported, ParityError when the exported
    graph is invalid or onnxruntime disagrees with PyTorch (then nothing is written to `out`).
    The model is put in eval mode for the export and returned to its previous mode afterwards.
    """
    start = time.perf_counter()
    out = Path(out)
    check_writable(out, overwrite)  # before the slow part
    input_size = _check_arguments(input_size, atol, probe_batch)
    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()
    if not isinstance(model, nn.Module):
        raise BadInputError(f"cannot export a {type(model).__name__}; pass a torch.nn.Module.")
    props = _metadata_props(metadata)

    fixed_batch = _fixed_batch(model, input_size)
    dynamic = fixed_batch is None
    if dynamic:
        # The probe batch must differ from the export batch, or it proves nothing about the axis.
        export_batch = EXPORT_BATCH if probe_batch != EXPORT_BATCH else EXPORT_BATCH + 1
    else:
        export_batch = probe_batch = fixed_batch

    with output_lock(out), _eval_mode(model):  # a second export to the same `out` stops at once (exit 2)
        example = _probe_input(export_batch, input_size, seed + 1)
        _check_forward(model, example)
        proto, exporter = _export(model, example, dynamic)
        _set_metadata(proto, props)
        _check_graph(proto)
        if proto.ByteSize() > _PROTOBUF_LIMIT:
            raise BadInputError(
                "the exported model is over 2 GB, which a single ONNX file cannot hold; "
                "mishield writes only self-contained files."
            )
        with atomic_output(out, overwrite) as tmp:
            tmp.write_bytes(proto.SerializeToString())
            diff, agreement = _parity(model, tmp, input_size, probe_batch, seed)
            if not (diff <= atol and agreement == 1.0):
                raise ParityError(
                    f"onnxruntime disagrees with PyTorch on {probe_batch} probe images "
                    f"(max abs logit diff {diff:.3g}, allowed {atol:.3g}; top-1 agreement "
                    f"{agreement:.0%}), so {out} was not written; check the model for "
                    "export-sensitive code or raise `atol` if the diff is only float noise."
                )
    return OnnxExportReport(
        path=out,
        opset=_opset(proto),
        max_abs_diff=diff,
        top1_agreement=agreement,
        probe_batch=probe_batch,
        file_bytes=out.stat().st_size,
        seconds=time.perf_counter() - start,
        exporter=exporter,
        dynamic_batch=dynamic,
    )


def loaded_model_metadata(loaded: Any) -> dict[str, str]:
    """ONNX metadata for a `mishield.models.LoadedModel`: what rebuilds and feeds the model."""
    props: dict[str, str] = {}
    if loaded.arch:
        props["arch"] = str(loaded.arch)
    if loaded.num_classes is not None:
        props["num_classes"] = str(loaded.num_classes)
    props["preprocessing"] = json.dumps(loaded.preprocessing.to_dict(), sort_keys=True)
    surgery = (loaded.recipe or {}).get("surgery")
    if surgery:
        props["surgery"] = json.dumps(surgery, sort_keys=True)
    if loaded.source_sha256:
        props["source_sha256"] = str(loaded.source_sha256)
    props["source_kind"] = str(loaded.kind)
    return props


# --- steps ---------------------------------------------------------------------------------


def _check_arguments(input_size, atol: float, probe_batch: int) -> tuple[int, int, int]:
    size = tuple(int(v) for v in input_size)
    if len(size) != 3 or min(size) < 1:
        raise BadInputError(f"input_size must be (channels, height, width) with positive sizes, got {input_size}.")
    if not atol >= 0:
        raise BadInputError(f"atol must be a non-negative number, got {atol}.")
    if probe_batch < 1:
        raise BadInputError(f"probe_batch must be at least 1, got {probe_batch}.")
    return size  # type: ignore[return-value]


def _metadata_props(metadata: dict[str, Any] | None) -> dict[str, str]:
    props = {}
    for key, value in (metadata or {}).items():
        props[str(key)] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    props["mishield_version"] = mishield.__version__
    return props


def _fixed_batch(model: nn.Module, input_size: tuple[int, int, int]) -> int | None:
    """The batch size a shape-specialised graph (an ExportedProgram's module) insists on, if any."""
    shape = _recorded_input_shape(model)
    if shape is None:
        return None
    if len(shape) != 4:
        raise BadInputError(
            f"the exported program takes a {len(shape)}-d input; mishield exports image classifiers (N, C, H, W)."
        )
    expected = tuple(d if isinstance(d, int) else None for d in shape[1:])
    if any(e is not None and e != s for e, s in zip(expected, input_size)):
        shown = "x".join("?" if e is None else str(e) for e in expected)
        raise BadInputError(
            f"the exported program expects {shown} inputs but the input size is "
            f"{'x'.join(map(str, input_size))}; pass `input_size` {expected[1] or input_size[1]}."
        )
    return shape[0] if isinstance(shape[0], int) else None


def _recorded_input_shape(model: nn.Module) -> tuple | None:
    # torch.export records the traced shapes (ints, or SymInts for dynamic dims) on placeholders;
    # symbolic_trace'd GraphModules record nothing and are not specialised.
    if not isinstance(model, torch.fx.GraphModule):
        return None
    for node in model.graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            return tuple(val.shape) if isinstance(val, torch.Tensor) else None
    return None


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    try:
        model.eval()
    except NotImplementedError:
        # ExportedProgram modules refuse train()/eval(); their mode was fixed when exported.
        yield
        return
    try:
        yield
    finally:
        model.train(was_training)


def _probe_input(batch: int, input_size: tuple[int, int, int], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *input_size), generator=generator)


def _device(model: nn.Module) -> torch.device:
    for tensor in _tensors(model):
        return tensor.device
    return torch.device("cpu")


def _tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    yield from model.parameters()
    yield from model.buffers()


def _forward(model: nn.Module, x: torch.Tensor) -> Any:
    with torch.no_grad():
        return model(x.to(_device(model)))


def _check_forward(model: nn.Module, example: torch.Tensor) -> None:
    """Fail early and clearly on a wrong input size or a non-classifier, before the slow export."""
    shape = "x".join(map(str, example.shape))
    try:
        y = _forward(model, example)
    except Exception as err:
        raise BadInputError(
            f"the model fails on a {shape} input ({_innermost_cause(err)}); check `input_size`."
        ) from err
    if not isinstance(y, torch.Tensor) or y.ndim != 2 or y.shape[0] != example.shape[0]:
        got = f"a tensor of shape {tuple(y.shape)}" if isinstance(y, torch.Tensor) else f"a {type(y).__name__}"
        raise BadInputError(
            f"the model returns {got} on a {shape} input, not (batch, classes) logits, "
            "so it cannot be exported as a classifier."
        )


def _export(model: nn.Module, example: torch.Tensor, dynamic: bool):
    """Return (onnx.ModelProto, name of the exporter that produced it)."""
    try:
        with _quiet():
            if isinstance(model, torch.jit.ScriptModule):
                return _export_torchscript(model, example, dynamic)
            return _export_dynamo(model, example, dynamic), "dynamo"
    except MishieldError:
        raise
    except Exception as err:
        raise BadInputError(f"ONNX export failed ({_innermost_cause(err)}); {_DEBUG_HINT}.") from err


def _export_dynamo(model: nn.Module, example: torch.Tensor, dynamic: bool):
    import onnxscript  # noqa: F401  (the dynamo exporter needs it; fail with its name, not deep inside torch)

    dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    program = torch.onnx.export(
        model,
        (example.to(_device(model)),),
        dynamo=True,
        opset_version=OPSET,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=dynamic_shapes,
        external_data=False,
        verbose=False,
    )
    return program.model_proto


def _export_torchscript(model: torch.jit.ScriptModule, example: torch.Tensor, dynamic: bool):
    try:
        # Private but the route torch itself recommends for ScriptModules in its error message.
        from torch._export.converter import TS2EPConverter

        program = TS2EPConverter(model, (example.to(_device(model)),)).convert()
        # The converter leaves every dimension symbolic; re-exporting its module pins C, H, W.
        return _export_dynamo(program.module(), example, dynamic), "dynamo (TorchScript converted)"
    except Exception as err:  # noqa: BLE001 - private converter; the legacy exporter is the fallback
        logging.getLogger(__name__).debug("TorchScript conversion failed, using the legacy exporter: %s", err)
    return _export_legacy(model, example, dynamic), "torchscript"


def _export_legacy(model: torch.jit.ScriptModule, example: torch.Tensor, dynamic: bool):
    import onnx

    buffer = io.BytesIO()
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic else None
    torch.onnx.export(
        model,
        (example.to(_device(model)),),
        buffer,
        dynamo=False,
        opset_version=OPSET,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes=axes,
    )
    return onnx.load_from_string(buffer.getvalue())


def _set_metadata(proto, props: dict[str, str]) -> None:
    existing = {p.key: p for p in proto.metadata_props}
    for key, value in props.items():
        entry = existing.get(key) or proto.metadata_props.add(key=key)
        entry.value = value


def _check_graph(proto) -> None:
    import onnx

    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as err:
        raise ParityError(f"the exported graph fails onnx.checker ({_innermost_cause(err)}); {_DEBUG_HINT}.") from err


def _parity(model: nn.Module, path: Path, input_size, batch: int, seed: int) -> tuple[float, float]:
    """Max abs logit difference and top-1 agreement between PyTorch and onnxruntime (CPU)."""
    import numpy as np
    import onnxruntime as ort

    x = _probe_input(batch, input_size, seed)
    reference = _forward(model, x).float().cpu().numpy()
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
    except Exception as err:
        raise ParityError(f"onnxruntime cannot run the exported model ({_innermost_cause(err)}); {_DEBUG_HINT}.") from err
    if got.shape != reference.shape:
        raise ParityError(
            f"onnxruntime returns logits of shape {got.shape} for a batch of {batch}, PyTorch "
            f"{reference.shape}; the batch axis did not export as dynamic."
        )
    diff = float(np.max(np.abs(got.astype(np.float64) - reference.astype(np.float64)))) if got.size else 0.0
    if np.isnan(diff):
        diff = float("inf")  # a NaN on either side is a disagreement, not a pass
    agreement = float(np.mean(got.argmax(-1) == reference.argmax(-1))) if got.size else 1.0
    return diff, agreement


def _opset(proto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), OPSET)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep torch's exporter from writing to stdout (--json) or dumping graphs on stderr.

    With MISHIELD_DEBUG=1 everything comes through, for diagnosing a failed export.
    """
    if os.environ.get("MISHIELD_DEBUG") == "1":
        yield
        return
    sink = io.StringIO()
    loggers = [logging.getLogger(name) for name in ("torch", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _innermost_cause(err: BaseException) -> str:
    # torch wraps the real problem (the operator it could not convert, the guard it could not
    # satisfy) in generic "this is step k/3" advice; the innermost cause names it.
    root = err
    while (root.__cause__ or root.__context__) is not None:
        root = root.__cause__ or root.__context__
    text = _ANSI.sub("", str(root))
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = line.rstrip(".")
    if len(line) > 240:
        line = line[:237] + "..."
    return f"{type(root).__name__}: {line}" if line else type(root).__name__
