"""What a bug report needs to know about this machine: versions, devices, paths, data integrity.

`describe_environment()` is `mishield env`'s document. Package versions come from the installed
distributions' metadata (`importlib.metadata`), so nothing heavy is imported for them; torch is
imported only for the device section, and a missing or broken torch is reported, not raised.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import os
import platform
import sys
from pathlib import Path

SCHEMA_VERSION = 1
# sha256 of mishield/assets/fashion_mnist_subset.npz as committed; the demo, the tests and the
# examples train on it, so a damaged or replaced file must be visible in a bug report.
EMBEDDED_SHA256 = "55aae51432a565220dc074354a38cf70ab1804cc13200e5eebb0c14df10590c9"
# `mishield.data.EMBEDDED_ASSET`, named again here (a test pins the two equal) because importing
# mishield.data imports torchvision, which doubles the time `mishield env` takes.
EMBEDDED_ASSET = "fashion_mnist_subset.npz"
PACKAGES = ("mishield", "torch", "torchvision", "timm", "onnx", "onnxruntime", "onnxscript", "safetensors",
            "numpy", "pillow", "typer", "rich", "jinja2", "pyyaml")


def package_versions() -> dict[str, str | None]:
    """Installed version of each of PACKAGES (None: not installed), plus Python's."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    if found["mishield"] is None:  # running from a checkout that was never installed
        from mishield import __version__

        found["mishield"] = __version__
    return found


def devices() -> dict:
    """CUDA availability, each GPU's name, memory and bf16 support, and the CPU threads torch uses."""
    try:
        import torch
    except Exception as err:  # noqa: BLE001 - a broken torch is exactly what a bug report must show
        return {"error": f"torch could not be imported ({type(err).__name__}: {err})"}
    cuda = torch.cuda.is_available()
    gpus = []
    for i in range(torch.cuda.device_count() if cuda else 0):
        props = torch.cuda.get_device_properties(i)
        gpus.append({"index": i, "name": props.name, "memory_gib": round(props.total_memory / 2**30, 2),
                     "capability": f"{props.major}.{props.minor}"})
    return {
        # A CUDA build of torch on a machine without a GPU is several GB for nothing: say which it is.
        "torch_build": f"cuda {torch.version.cuda}" if torch.version.cuda else "cpu",
        "cuda_available": cuda,
        "cuda_version": torch.version.cuda,
        "gpus": gpus,
        "bf16_supported": bool(cuda and torch.cuda.is_bf16_supported()),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def embedded_data() -> dict:
    """Where the embedded Fashion-MNIST subset is and whether its bytes match EMBEDDED_SHA256."""
    from mishield.fileio import sha256_file

    resource = importlib.resources.files("mishield") / "assets" / EMBEDDED_ASSET
    with importlib.resources.as_file(resource) as path:
        if not path.is_file():
            return {"path": str(path), "present": False, "sha256": None, "expected_sha256": EMBEDDED_SHA256, "intact": False}
        digest = sha256_file(path)
        return {"path": str(path), "present": True, "sha256": digest, "expected_sha256": EMBEDDED_SHA256,
                "intact": digest == EMBEDDED_SHA256}


def paths() -> dict[str, str | None]:
    """The caches and folders mishield reads or writes besides the paths given on the command line."""
    home = Path.home()
    torch_home = os.environ.get("TORCH_HOME") or str(Path(os.environ.get("XDG_CACHE_HOME", home / ".cache")) / "torch")
    hf_home = os.environ.get("HF_HOME") or str(Path(os.environ.get("XDG_CACHE_HOME", home / ".cache")) / "huggingface")
    return {
        "package": str(Path(__file__).resolve().parent),
        "torch_home": torch_home,  # torchvision pretrained weights
        "hf_home": hf_home,  # timm pretrained weights (Hugging Face hub)
        "cwd": os.getcwd(),
    }


def describe_environment() -> dict:
    """The `mishield env --json` document (schema mishield/schemas/env.schema.json)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "versions": package_versions(),
        "platform": {"system": platform.system(), "release": platform.release(), "machine": platform.machine(),
                     "python_executable": sys.executable},
        "devices": devices(),
        "paths": paths(),
        "embedded_data": embedded_data(),
        "environment": {k: os.environ[k] for k in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MISHIELD_DEBUG", "NO_COLOR")
                        if k in os.environ},
    }
