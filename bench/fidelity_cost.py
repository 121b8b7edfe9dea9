"""What the distribution metrics and the KNN judge cost (mishield/audit/fidelity.py), at audit sizes.

    python bench/fidelity_cost.py                       # the sizes below, one torch thread
    python bench/fidelity_cost.py --classes 129 --recon 20 --private 15 --dims 128 256 512
    python bench/fidelity_cost.py --demo DEMO_DIR --prior PRIOR.safetensors --runs 4   # a real audit, figures on and off

With `--demo` (the folder `mishield demo --quick --out DEMO_DIR` wrote, and a prior of format 2,
i.e. made by this version's `mishield prior train`, so that the public space exists): the demo's
models audited with the demo's quick budget, alternately with `AuditConfig.feature_metrics` on
and off in one process, wall and process CPU seconds per run, the medians, and what each feature
space timed itself (`feature_extractors[].seconds`).

Per setting: `fidelity_summary` (FID, precision, recall, density, coverage per class and pooled,
FID_inf when the pooled sets are large enough), `knn_judge_hits` (every reconstruction against
every private image) and `judge_agreement` (four class-bootstrap intervals and the ratio one).
The features are synthetic, one Gaussian cluster per class: the cost depends on the sizes, not on
what the features show. Times are wall and process CPU seconds; the issue's budget is that the
added figures stay under 15 % of the audit's CPU time.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch

# after the path: the checkout's mishield; at the top so that tests/test_bench.py sees a moved name
from mishield.audit.fidelity import fidelity_summary, judge_agreement, knn_judge_hits


def features(classes: int, per_class: int, dims: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dims, generator=g) * 3
    return {c: centres[c] + torch.randn(per_class, dims, generator=g) for c in range(classes)}


def one_setting(classes: int, recon: int, private: int, dims: int, extrapolate: bool) -> dict:

    fakes, reals = features(classes, recon, dims, 0), features(classes, private, dims, 1)
    summary = fidelity_summary(fakes, reals, extractor="synthetic", extrapolate=extrapolate)
    wall, cpu = time.perf_counter(), time.process_time()
    x, y = torch.cat(list(fakes.values())), torch.arange(classes).repeat_interleave(recon)
    p, py = torch.cat(list(reals.values())), torch.arange(classes).repeat_interleave(private)
    knn = knn_judge_hits(x, y, p, py).view(classes, recon).numpy()
    judge_wall, judge_cpu = time.perf_counter() - wall, time.process_time() - cpu
    wall, cpu = time.perf_counter(), time.process_time()
    judge_agreement(knn, knn[:, ::-1].copy())
    return {"setting": f"{classes} x {recon} recon vs {private} private, {dims} dims", "extrapolate": extrapolate,
            "summary_wall": summary["seconds"]["wall"], "summary_cpu": summary["seconds"]["cpu"],
            "per_class_wall": summary["seconds"]["per_class_wall"], "judge_wall": judge_wall, "judge_cpu": judge_cpu,
            "agreement_wall": time.perf_counter() - wall, "agreement_cpu": time.process_time() - cpu,
            "fid_extrapolated": summary["pooled"]["fid_extrapolated"] is not None}  # fmt: skip


def audit_runs(demo: Path, prior: Path, runs: int) -> None:
    """The demo's audit with the figures on and off, alternating (`--demo`)."""
    import os
    import statistics

    import mishield
    from mishield.audit.config import AuditConfig

    models = [demo / f for f in ("original.pt", "rolss-tts.pt", "ssf.pt", "bido-rolss.pt") if (demo / f).exists()]
    budget = {"samples": 40, "candidates": 4, "iterations": 5, "keep": 4, "final_augmentations": 2, "batch_size": 40}  # demo --quick
    seen: dict[bool, list] = {True: [], False: []}
    for run in range(runs):
        for on in (True, False):
            config = AuditConfig.preset(**budget, seed=0, device="cpu", overwrite=True, allow_weak_evaluator=True, feature_metrics=on)
            wall, cpu = time.perf_counter(), time.process_time()
            report = mishield.audit(models, data=demo / "data" / "private", prior=prior, eval_model=demo / "eval.pt", config=config,
                                    out=demo / f"cost-audit-{'on' if on else 'off'}")  # fmt: skip
            seen[on].append((time.perf_counter() - wall, time.process_time() - cpu))
            spaces = {e["extractor"]: e["seconds"] for e in report.feature_extractors}
            print(f"run {run}, figures {'on' if on else 'off'}: {seen[on][-1][0]:.1f} s wall, {seen[on][-1][1]:.1f} s CPU, "
                  f"load {os.getloadavg()[0]:.1f}; {spaces}", flush=True)  # fmt: skip
    for on in (True, False):
        print(f"figures {'on' if on else 'off'}: median {statistics.median(w for w, _ in seen[on]):.1f} s wall, "
              f"{statistics.median(c for _, c in seen[on]):.1f} s CPU")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, nargs="+", default=[129, 5])
    parser.add_argument("--recon", type=int, default=20, help="kept reconstructions per class (K)")
    parser.add_argument("--private", type=int, nargs="+", default=[15, 300], help="private images per class, one per --classes")
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--demo", type=Path, help="audit this quick demo's models instead (figures on and off)")
    parser.add_argument("--prior", type=Path, help="with --demo: a prior of format 2 (it keeps its discriminator)")
    parser.add_argument("--runs", type=int, default=4, help="with --demo: alternating runs per setting")
    args = parser.parse_args()
    if args.demo is not None:
        audit_runs(args.demo, args.prior or args.demo / "prior.safetensors", args.runs)
        return
    if len(args.private) != len(args.classes):
        parser.error("give one --private per --classes")
    torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}")
    print("| setting | FID_inf | summary wall / CPU s (per class) | KNN judge wall / CPU s | agreement wall / CPU s |")
    print("|---|---|---|---|---|")
    for classes, private in zip(args.classes, args.private):
        for dims in args.dims:
            for extrapolate in (False, True):
                r = one_setting(classes, args.recon, private, dims, extrapolate)
                fx = "on" if r["fid_extrapolated"] else ("off" if not extrapolate else "skipped (too few rows)")
                print(f"| {r['setting']} | {fx} | {r['summary_wall']:.2f} / {r['summary_cpu']:.2f} ({r['per_class_wall']:.2f}) "
                      f"| {r['judge_wall']:.2f} / {r['judge_cpu']:.2f} | {r['agreement_wall']:.2f} / {r['agreement_cpu']:.2f} |",
                      flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
