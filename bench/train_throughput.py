"""Training-step throughput: mishield's epoch loop against a bare PyTorch loop, and BiDO's cost.

    python bench/train_throughput.py            # CUDA: ResNet-50, 224 px, batch 128, bf16 + channels_last
    python bench/train_throughput.py --quick    # CPU-sized: ResNet-18, 64 px, batch 32
    python bench/train_throughput.py --compile  # also torch.compile both loops

Prints one JSON document. All three loops (bare, mishield, mishield + BiDO) train the same
architecture from the same weights on the same device-resident batches with the same precision
and memory format, so the ratios isolate what mishield's loop adds (loss bookkeeping on the
device, a host sync every `sync_every` steps, the NaN check) and what the BiDO terms cost. The
loops are measured in interleaved rounds and the median round is reported, so slow drifts of a
shared machine hit all three alike. Data loading is deliberately excluded: it is the same
DataLoader for any training loop and is sized with --workers, not by the step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mishield.runtime import Runtime, make_runtime
from mishield.training import BiDOConfig, FeatureTap, TrainStep, find_feature_modules
from mishield.training.loop import _run_epoch, _StageContext


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Batches:
    """A loader stand-in: the same device-resident batches, `steps` of them per 'epoch'."""

    def __init__(self, batches, steps: int):
        self.batches, self.steps = batches, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for i in range(self.steps):
            yield self.batches[i % len(self.batches)]


def _bare_loop(model, optimizer, batches: _Batches, rt: Runtime) -> None:
    """What a careful engineer writes by hand: autocast, channels_last input, CE, Adam."""
    model.train()
    for x, y in batches:
        if rt.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(rt.device.type, dtype=rt.amp_dtype, enabled=rt.amp_dtype is not None):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def _make(arch: str, classes: int, rt: Runtime, state: dict | None, compile_model: bool):
    model = getattr(torchvision.models, arch)(num_classes=classes)
    if state is not None:
        model.load_state_dict(state)
    model.to(rt.device)
    if rt.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.999))
    net = torch.compile(model) if compile_model else model
    return model, net, optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU-sized run (default on machines without CUDA)")
    parser.add_argument("--arch", default=None, help="torchvision architecture (default resnet50 on CUDA, resnet18 on CPU)")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per loop per round")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3 on CUDA, 5 on CPU)")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 for float32 matmuls (BiDO's Gram matrices)")
    args = parser.parse_args()

    rt = make_runtime(args.device)
    cuda = rt.device.type == "cuda"
    quick = args.quick or not cuda
    arch = args.arch or ("resnet18" if quick else "resnet50")
    size = args.size or (64 if quick else 224)
    batch = args.batch or (32 if quick else 128)
    steps = args.steps or (5 if quick else 25)
    rounds = args.rounds or (5 if quick else 3)
    classes = 100
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = args.tf32

    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(batch, 3, size, size, generator=g).to(rt.device),
         torch.randint(0, classes, (batch,), generator=g).to(rt.device))
        for _ in range(4)
    ]
    timed = _Batches(batches, steps)
    warm = _Batches(batches, 3 if quick else 10)
    torch.manual_seed(0)
    init = getattr(torchvision.models, arch)(num_classes=classes).state_dict()

    loops = {}
    # bare PyTorch
    _, bare_net, bare_opt = _make(arch, classes, rt, init, args.compile)
    loops["bare"] = lambda b: _bare_loop(bare_net, bare_opt, b, rt)
    # mishield's epoch loop, without and with BiDO
    ctx = _StageContext(rt, None, None, None, classes, 0, args.compile)
    for name, bido in (("mishield", None), ("mishield_bido", BiDOConfig())):
        model, net, opt = _make(arch, classes, rt, init, args.compile)
        tap = None
        if bido is not None:
            points = find_feature_modules(model, batches[0][0][:2])
            tap = FeatureTap(model, points)
        step = TrainStep(net, opt, rt, num_classes=classes, bido=bido, tap=tap)
        loops[name] = (lambda b, net=net, step=step, opt=opt:
                       _run_epoch(ctx, net, step, b, "bench", 0, 1, opt))

    compile_s = {}
    for name, run in loops.items():
        t0 = time.perf_counter()
        run(warm)
        _sync(rt.device)
        compile_s[name] = round(time.perf_counter() - t0, 2)

    per_round: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(rounds):
        for name, run in loops.items():
            _sync(rt.device)
            t0 = time.perf_counter()
            run(timed)
            _sync(rt.device)
            per_round[name].append(steps * batch / (time.perf_counter() - t0))

    ips = {name: statistics.median(v) for name, v in per_round.items()}
    result = {
        "benchmark": "train_throughput",
        "device": torch.cuda.get_device_name(rt.device) if cuda else f"CPU ({platform.processor() or platform.machine()})",
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "arch": f"torchvision:{arch}",
        "input": [3, size, size],
        "batch": batch,
        "precision": "bf16 autocast" if rt.amp_dtype == torch.bfloat16 else "fp32",
        "channels_last": rt.channels_last,
        "compile": args.compile,
        "steps_per_round": steps,
        "rounds": rounds,
        "tf32": bool(cuda and args.tf32),
        "images_per_s": {k: round(v, 1) for k, v in ips.items()},
        "images_per_s_rounds": {k: [round(x, 1) for x in v] for k, v in per_round.items()},
        "mishield_vs_bare": round(ips["mishield"] / ips["bare"], 4),
        "bido_overhead": round(ips["mishield"] / ips["mishield_bido"] - 1.0, 4),
        "warmup_seconds": compile_s,
        "goal": {"mishield_vs_bare_at_least": 0.9, "bido_overhead_at_most": 0.25},
    }
    from mishield.training.bido import _MM_TO_FLOAT32

    result["bido_gram"] = ("bf16 operands, float32 output (tensor cores)"
                           if cuda and rt.amp_dtype is not None and _MM_TO_FLOAT32.get("cuda", True) else "float32")
    if cuda:
        result["max_memory_gib"] = round(torch.cuda.max_memory_allocated(rt.device) / 2**30, 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
