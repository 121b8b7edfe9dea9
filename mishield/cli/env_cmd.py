"""`mishield env`: versions, devices, paths and data integrity, for bug reports."""

from __future__ import annotations

from mishield.cli import console
from mishield.cli.options import JsonOpt


def env(json_output: JsonOpt = False) -> None:
    """Print versions, devices, cache paths and whether the embedded data is intact (paste it into bug reports)."""
    from mishield.environment import describe_environment

    doc = describe_environment()
    if json_output:
        console.emit_json(doc)
        return
    out = console.out
    out.print("[bold]versions[/]")
    for name, version in doc["versions"].items():
        out.print(f"  {name:<12} {version or 'not installed'}")
    dev = doc["devices"]
    out.print("[bold]devices[/]")
    if "error" in dev:
        out.print(f"  {dev['error']}")
    else:
        out.print(f"  torch build: {dev['torch_build']}")
        out.print(f"  CUDA {'available' if dev['cuda_available'] else 'not available'}"
                  + (f" (CUDA {dev['cuda_version']}), bf16 {'yes' if dev['bf16_supported'] else 'no'}" if dev["cuda_available"] else ""))
        for gpu in dev["gpus"]:
            out.print(f"  GPU {gpu['index']}: {gpu['name']}, {gpu['memory_gib']} GiB, compute {gpu['capability']}")
        out.print(f"  CPU: {dev['cpu_count']} cores, torch uses {dev['torch_threads']} threads")
    out.print("[bold]paths[/]")
    for name, path in doc["paths"].items():
        out.print(f"  {name:<12} {path}")
    data = doc["embedded_data"]
    state = "intact" if data["intact"] else ("MISSING" if not data["present"] else "DAMAGED (sha256 differs)")
    out.print(f"[bold]embedded Fashion-MNIST[/] {state}: {data['path']}")
