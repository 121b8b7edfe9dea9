"""How long RoLSS surgery (plan + apply) takes on a real architecture, against one forward pass.

    python bench/surgery_speed.py [--arch torchvision:resnet152] [--input-size 224] [--repeats 5]

Prints one JSON document: median seconds for plan_surgery, apply_plan, and one eval-mode
forward pass of a single image at the same size (the reference), and their ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from mishield.models import build_architecture
from mishield.surgery import apply_plan, plan_surgery


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="torchvision:resnet152")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    model = build_architecture(args.arch, 1000).eval()
    size = (3, args.input_size, args.input_size)
    x = torch.randn(1, *size)
    plan = plan_surgery(model, "rolss", input_size=size)  # warm-up (imports, allocator)
    apply_plan(model, plan)

    plan_s = median_seconds(lambda: plan_surgery(model, "rolss", input_size=size), args.repeats)
    apply_s = median_seconds(lambda: apply_plan(model, plan), args.repeats)
    with torch.inference_mode():
        forward_s = median_seconds(lambda: model(x), args.repeats)
    print(json.dumps({
        "arch": args.arch,
        "input_size": list(size),
        "plan_seconds": round(plan_s, 4),
        "apply_seconds": round(apply_s, 4),
        "surgery_seconds": round(plan_s + apply_s, 4),
        "forward_seconds_batch1": round(forward_s, 4),
        "surgery_over_forward": round((plan_s + apply_s) / forward_s, 2),
        "hardware": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": str(torch.__version__),
    }, indent=2))


if __name__ == "__main__":
    main()
