"""How far float32 itself, and onnxruntime, sit from a float64 forward of the same weights.

    python bench/float32_noise.py [--arch torchvision:resnet101] [--input-size 64]

The ONNX gate compares onnxruntime's logits with PyTorch's float32 logits at an absolute 1e-4;
this prints the max |logit| difference of PyTorch float32 vs float64, onnxruntime vs float64 and
onnxruntime vs PyTorch float32 on a seeded probe batch, for an architecture with random weights
and batch-norm statistics estimated on two random batches (as in tests/surgery/test_zoo.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from mishield.models import build_architecture
from mishield.onnx_export import export_onnx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="torchvision:resnet101")
    parser.add_argument("--input-size", type=int, default=64)
    args = parser.parse_args()

    torch.manual_seed(0)
    size = (3, args.input_size, args.input_size)
    model = build_architecture(args.arch, 10)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                m.reset_running_stats()
                m.momentum = None
        model.train()
        for _ in range(2):
            model(torch.randn(4, *size))
    model.eval()
    x = torch.randn(3, *size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fp32 = model(x).double().numpy()
        fp64 = copy.deepcopy(model).double()(x.double()).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(model, path, input_size=size, atol=float("inf"))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        onnx = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0].astype(np.float64)
    print(json.dumps({
        "arch": args.arch,
        "input_size": list(size),
        "max_abs_logit": float(np.abs(fp64).max()),
        "torch_fp32_vs_fp64": float(np.abs(fp32 - fp64).max()),
        "onnxruntime_vs_fp64": float(np.abs(onnx - fp64).max()),
        "onnxruntime_vs_torch_fp32": float(np.abs(onnx - fp32).max()),
    }, indent=2))


if __name__ == "__main__":
    main()
