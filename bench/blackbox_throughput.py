"""Target queries per second of the black-box attack, and the transfer attack's step, against the gradient step.

    python bench/blackbox_throughput.py              # CUDA if present, else the small CPU setting
    python bench/blackbox_throughput.py --device cpu --mode labels

At the generator, target, batch and settings of bench/attack_throughput.py (CUDA: a 128 px
DCGAN-like generator and ResNet-152 at 224 px; CPU: a 32 px generator and ResNet-18 at 64 px),
one run measures in interleaved rounds (the median counts):

* blackbox: `BlackBoxAttack`'s optimisation phase (`mishield.attack.blackbox`) over `batch`
  candidates of mixed classes, in target queries (images through generator and target, forward
  only) per second;
* gradient: PPA's `InversionStep` with its Adam update at the same batch, in image-steps
  (forward + backward) per second;
* bare: a forward pass of generator and target alone under `torch.no_grad()` at the black-box
  attack's pass size: the ceiling its queries can approach;
* transfer: the transfer attack's step (`mishield.attack.transfer`: the engine's step with a
  torchvision ResNet-18 surrogate, mishield's default surrogate architecture, as the only model),
  in image-steps per second. Its selection runs on the surrogate too; the target is never queried.

It prints one JSON document with the rates, blackbox / bare, and what the two default budgets
cost per candidate in seconds (PPA's z-space 100 steps against the black-box default's
`queries_per_candidate`).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torchvision
from attack_throughput import SETTINGS, _sync, _timed, build, mishield_step

from mishield.attack.augment import candidate_keys
from mishield.attack.blackbox import BlackBoxAttack, BlackBoxConfig
from mishield.attack.config import GENERATIONS_PER_STEP, make_config
from mishield.attack.priors import Z_SPACE_BUDGET, GeneratorPrior
from mishield.preprocessing import Preprocessing
from mishield.runtime import Runtime, autocast


def blackbox_phase(generator, target, s: dict, runtime: Runtime, compile_: bool, blackbox: BlackBoxConfig):
    """The attack's optimisation phase on `batch` candidates; returns (run(), queries per run)."""
    if runtime.channels_last:
        for model in (target, generator):
            model.to(memory_format=torch.channels_last)
    prior = GeneratorPrior(generator, s["latent"], {"source": "bench"})
    config = make_config("default", samples=s["batch"], candidates=s["per_class"], keep=1, batch_size=s["batch"], compile=compile_)
    attack = BlackBoxAttack(prior, target, Preprocessing((3, s["input"], s["input"])), config, runtime, blackbox)
    n = s["batch"]
    labels = torch.arange(n, device=runtime.device) % s["classes"]
    keys = candidate_keys(0, labels, torch.arange(n, device=runtime.device))
    latents = torch.randn(n, s["latent"], device=runtime.device)

    def run() -> None:
        attack._optimise(latents.clone(), labels, keys, None)  # the phase `run` calls between the selections

    return run, n * blackbox.queries_per_candidate, attack.candidates_per_pass() * blackbox.population * blackbox.crops_per_member


def bare_forward(generator, target, s: dict, runtime: Runtime, images: int):
    """Generator + target forward, no grad, at the black-box attack's pass size: the ceiling of its query rate."""
    z = torch.randn(images, s["latent"], device=runtime.device)
    size = (s["input"], s["input"])

    @torch.no_grad()
    def step() -> None:
        with autocast(runtime):
            x = torch.nn.functional.interpolate(generator(z), size=size, mode="bilinear", align_corners=False)
            if runtime.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            target(x)

    return step, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="auto: on for CUDA")
    parser.add_argument("--mode", choices=["scores", "labels"], default="scores")
    parser.add_argument("--generations", type=int, default=None, help="per timed run (default: the setting's steps)")
    parser.add_argument("--population", type=int, default=BlackBoxConfig.population)
    parser.add_argument("--query-batch", type=int, default=None, help="images per target pass (default: 4 x batch)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    cuda = device.type == "cuda"
    s = dict(SETTINGS["cuda" if cuda else "cpu"])
    compile_ = args.compile == "on" or (args.compile == "auto" and cuda)
    runtime = Runtime(device, amp_dtype=torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else None, channels_last=cuda)
    timed = BlackBoxConfig(mode=args.mode, generations=args.generations or s["steps"], population=args.population, query_batch=args.query_batch)
    default = BlackBoxConfig(mode=args.mode, generations=round(GENERATIONS_PER_STEP * Z_SPACE_BUDGET["iterations"]))
    t_start = time.perf_counter()
    black, queries, pass_images = blackbox_phase(*build(s, device), s, runtime, compile_, timed)
    gradient, n = mishield_step(*build(s, device), s, runtime, compile_)
    bare, _ = bare_forward(*build(s, device), s, runtime, pass_images)
    surrogate = torchvision.models.resnet18(num_classes=s["classes"]).eval().requires_grad_(False).to(device)
    transfer, _ = mishield_step(build(s, device)[0], surrogate, s, runtime, compile_)
    warm = time.perf_counter()
    black()
    gradient(3)
    transfer(3)
    bare()
    _sync(device)
    warmup_s = time.perf_counter() - warm
    rates: dict[str, list[float]] = {"blackbox_queries": [], "gradient_image_steps": [], "transfer_image_steps": [], "bare_forward": []}
    for _ in range(args.rounds):
        rates["blackbox_queries"].append(queries / _timed(black, device, warmup=0, repeat=1))
        rates["gradient_image_steps"].append(n * s["steps"] / _timed(lambda: gradient(s["steps"]), device, warmup=0, repeat=1))
        rates["transfer_image_steps"].append(n * s["steps"] / _timed(lambda: transfer(s["steps"]), device, warmup=0, repeat=1))
        rates["bare_forward"].append(pass_images / _timed(bare, device, warmup=0, repeat=s["steps"]))
    median = {k: statistics.median(v) for k, v in rates.items()}
    ppa_steps = Z_SPACE_BUDGET["iterations"]
    print(json.dumps({
        "device": torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "setting": {**s, "bf16": runtime.amp_dtype is not None, "channels_last": runtime.channels_last, "compile": compile_,
                    "blackbox": timed.to_dict(), "pass_images": pass_images},
        "per_s": {k: round(v, 1) for k, v in median.items()},
        "rounds": {k: [round(x, 1) for x in v] for k, v in rates.items()},
        "ratios": {"queries_vs_gradient_image_steps": round(median["blackbox_queries"] / median["gradient_image_steps"], 2),
                   "blackbox_vs_bare_forward": round(median["blackbox_queries"] / median["bare_forward"], 3),
                   "transfer_vs_gradient_image_steps": round(median["transfer_image_steps"] / median["gradient_image_steps"], 2)},
        "seconds_per_candidate": {f"ppa_{ppa_steps}_steps": round(ppa_steps / median["gradient_image_steps"], 4),
                                  f"blackbox_{default.queries_per_candidate}_queries": round(default.queries_per_candidate / median["blackbox_queries"], 4),
                                  f"transfer_{ppa_steps}_steps_resnet18": round(ppa_steps / median["transfer_image_steps"], 4)},
        "warmup_s": round(warmup_s, 1),
        "total_s": round(time.perf_counter() - t_start, 1),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
