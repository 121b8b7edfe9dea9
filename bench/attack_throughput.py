"""Image-steps per second of mishield's attack step against two yardsticks (docs/architecture.md §9).

    python bench/attack_throughput.py            # CUDA if present, else a small CPU setting
    python bench/attack_throughput.py --device cpu

One run measures, at the same generator and target:

* mishield: `InversionStep` as the audit runs it (all classes in one batch; on CUDA bf16
  autocast, channels_last and, by default, torch.compile) plus its Adam update;
* naive: a PPA-style loop written here: fp32, eager, one class per batch, torchvision's
  RandomResizedCrop (one crop per batch), Poincaré loss, Adam;
* bare: forward + backward of generator and target alone at mishield's batch and settings
  (resize only, no augmentation, loss or optimizer): the ceiling an attack step can approach.

and prints one JSON document with the rates and the ratios mishield/naive and mishield/bare.

A second row (`--rows surrogates`) times LOMMA's model augmentation: seconds per `InversionStep`
step with k ResNet-18 surrogates (k = 1, 2; at the bench's input size) against k + 1 separate bare
forward + backward passes (generator + one model each) measured in the same run; a ratio below 1
means the shared generator and crop already save time over attacking the models one by one.
CUDA: a 128 px DCGAN-like generator and ResNet-152 at 224 px (530 classes, FaceScrub's count);
CPU: a 32 px generator and ResNet-18 at 64 px.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torchvision.transforms import v2 as T

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mishield.attack.augment import candidate_keys
from mishield.attack.config import make_config
from mishield.attack.engine import InversionStep
from mishield.attack.poincare import poincare_loss
from mishield.attack.priors import DCGANGenerator, GeneratorPrior
from mishield.preprocessing import Preprocessing
from mishield.runtime import Runtime

SETTINGS = {
    "cuda": {"arch": "resnet152", "input": 224, "resolution": 128, "latent": 128, "width": 64, "classes": 530,
             "batch": 256, "per_class": 25, "steps": 30, "naive_steps": 30},
    "cpu": {"arch": "resnet18", "input": 64, "resolution": 32, "latent": 64, "width": 32, "classes": 10,
            "batch": 80, "per_class": 8, "steps": 6, "naive_steps": 6},
}  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, warmup: int, repeat: int) -> float:
    """Seconds per call after `warmup` calls (compilation and autotuning happen there)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / repeat


def build(s: dict, device: torch.device):
    torch.manual_seed(0)
    generator = DCGANGenerator(s["latent"], s["resolution"], 3, s["width"]).eval().requires_grad_(False)
    target = getattr(torchvision.models, s["arch"])(num_classes=s["classes"]).eval().requires_grad_(False)
    return generator.to(device), target.to(device)


def naive_loop(generator, target, s: dict, device: torch.device):
    """PPA's structure: one class per batch, fp32, eager, batch-wide crop, Adam on z."""
    crop = T.RandomResizedCrop(s["input"], scale=(0.9, 1.0), ratio=(1.0, 1.0), antialias=True)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)
    z = torch.randn(s["per_class"], s["latent"], device=device, requires_grad=True)
    labels = torch.full((s["per_class"],), 7, device=device)
    optimizer = torch.optim.Adam([z], lr=0.005, betas=(0.1, 0.1))

    def step() -> None:
        images = crop(generator(z))
        logits = target(((images + 1) / 2 - mean) / std)
        loss = poincare_loss(logits, labels).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step, s["per_class"]


def mishield_step(generator, target, s: dict, runtime: Runtime, compile_: bool, surrogates=()):
    """The audit's own step: one Adam over `iterations` steps of the full mixed-class batch."""
    if runtime.channels_last:
        for model in (target, generator, *surrogates):
            model.to(memory_format=torch.channels_last)
    prior = GeneratorPrior(generator, s["latent"], {"source": "bench"})
    config = make_config("default", samples=s["batch"], candidates=s["per_class"], keep=1, batch_size=s["batch"], compile=compile_)
    pre = Preprocessing((3, s["input"], s["input"]))
    step = InversionStep(prior, target, pre, config, runtime, surrogates=[(m, pre) for m in surrogates])
    n = s["batch"]
    labels = torch.arange(n, device=runtime.device) % s["classes"]
    keys = candidate_keys(0, labels, torch.arange(n, device=runtime.device))
    latents = torch.randn(n, s["latent"], device=runtime.device)

    def many(iterations: int) -> None:
        step.run(latents, labels, keys, iterations)

    return many, n


def bare_step(generator, target, s: dict, runtime: Runtime, compile_: bool):
    n = s["batch"]
    size = (s["input"], s["input"])

    def forward_backward(z: torch.Tensor) -> torch.Tensor:
        ctx = torch.autocast(runtime.device.type, dtype=runtime.amp_dtype) if runtime.amp_dtype else torch.autocast("cpu", enabled=False)
        with ctx:
            images = F.interpolate(generator(z), size=size, mode="bilinear", align_corners=False)
            if runtime.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            return target(images).float().sum()

    fb = torch.compile(forward_backward) if compile_ else forward_backward
    z = torch.randn(n, s["latent"], device=runtime.device, requires_grad=True)

    def step() -> None:
        fb(z).backward()
        z.grad = None

    return step, n


def surrogate_rows(s: dict, runtime: Runtime, compile_: bool, ks: list[int], rounds: int) -> dict:
    """Per k: seconds per step with k ResNet-18 surrogates vs k + 1 separate bare passes (medians)."""
    device = runtime.device

    def resnet18() -> torch.nn.Module:
        return torchvision.models.resnet18(num_classes=s["classes"]).eval().requires_grad_(False).to(device)

    generator, target = build(s, device)
    bare_target, n = bare_step(generator, target, s, runtime, compile_)
    bare_r18, _ = bare_step(generator, resnet18(), s, runtime, compile_)
    steps = {k: mishield_step(*build(s, device), s, runtime, compile_, [resnet18() for _ in range(k)])[0] for k in ks}
    for fn in (bare_target, bare_r18):
        fn()
    for many in steps.values():
        many(2)
    times: dict[str, list[float]] = {"bare_target": [], "bare_resnet18": [], **{f"k{k}": [] for k in ks}}
    for _ in range(rounds):
        times["bare_target"].append(_timed(bare_target, device, warmup=0, repeat=s["steps"]))
        times["bare_resnet18"].append(_timed(bare_r18, device, warmup=0, repeat=s["steps"]))
        for k, many in steps.items():
            times[f"k{k}"].append(_timed(lambda many=many: many(s["steps"]), device, warmup=0, repeat=1) / s["steps"])
    median = {key: statistics.median(v) for key, v in times.items()}
    rows = {}
    for k in ks:
        separate = median["bare_target"] + k * median["bare_resnet18"]
        rows[f"k={k}"] = {"step_s": round(median[f"k{k}"], 4), "separate_bare_s": round(separate, 4),
                          "ratio_step_vs_separate": round(median[f"k{k}"] / separate, 3)}  # fmt: skip
    return {"surrogate": "resnet18", "batch": n, "bare_target_s": round(median["bare_target"], 4),
            "bare_resnet18_s": round(median["bare_resnet18"], 4), **rows}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="auto: on for CUDA")
    parser.add_argument("--batch", type=int, help="mishield/bare batch (default: 256 on CUDA, 80 on CPU)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds; the median counts")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: stable on a shared machine)")
    parser.add_argument("--rows", default="main,surrogates", help="comma-separated: main (mishield/naive/bare), surrogates")
    parser.add_argument("--surrogates", default="0,1,2", help="the k values of the surrogates row (0: the step alone)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    s = dict(SETTINGS["cuda" if device.type == "cuda" else "cpu"])
    if args.batch:
        s["batch"] = args.batch
    compile_ = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    cuda = device.type == "cuda"
    fast = Runtime(device, amp_dtype=torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else None, channels_last=cuda)
    t_start = time.perf_counter()
    rows = set(args.rows.split(","))
    result: dict = {
        "device": torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "setting": {**s, "bf16": fast.amp_dtype is not None, "channels_last": fast.channels_last, "compile": compile_},
    }
    if "main" in rows:
        result.update(main_rows(s, device, fast, compile_, args.rounds))
    if "surrogates" in rows:
        result["surrogates"] = surrogate_rows(s, fast, compile_, [int(k) for k in args.surrogates.split(",")], args.rounds)
    result["total_s"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(result, indent=2))


def main_rows(s: dict, device: torch.device, fast: Runtime, compile_: bool, rounds: int) -> dict:
    """mishield's step, the naive loop and the bare passes, in interleaved rounds."""
    naive_fn, n_naive = naive_loop(*build(s, device), s, device)
    bare_fn, n = bare_step(*build(s, device), s, fast, compile_)
    many, _ = mishield_step(*build(s, device), s, fast, compile_)
    warm = time.perf_counter()
    for _ in range(3):
        naive_fn()
        bare_fn()  # compilation of the bare graph happens here
    many(3)  # ... and of mishield's step here
    _sync(device)
    warmup_s = time.perf_counter() - warm

    # Interleaved rounds, median per loop: drift on a shared machine hits all three alike.
    rates: dict[str, list[float]] = {"mishield": [], "naive": [], "bare": []}
    for _ in range(rounds):
        rates["naive"].append(n_naive / _timed(naive_fn, device, warmup=0, repeat=s["naive_steps"]))
        rates["bare"].append(n / _timed(bare_fn, device, warmup=0, repeat=s["steps"]))
        rates["mishield"].append(n * s["steps"] / _timed(lambda: many(s["steps"]), device, warmup=0, repeat=1))
    median = {k: statistics.median(v) for k, v in rates.items()}
    return {
        "image_steps_per_s": {k: round(v, 1) for k, v in median.items()},
        "rounds": {k: [round(x, 1) for x in v] for k, v in rates.items()},
        "ratios": {"mishield_vs_naive": round(median["mishield"] / median["naive"], 2),
                   "mishield_vs_bare": round(median["mishield"] / median["bare"], 3)},
        "warmup_s": round(warmup_s, 1),
    }  # fmt: skip

if __name__ == "__main__":
    main()
