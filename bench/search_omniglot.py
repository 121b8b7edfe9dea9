"""`harden --search` on the quick Omniglot setting, timed (issue 19: within 15 minutes on a 2-core CPU).

    python -m mishield demo --dataset omniglot --quick --out out/demo-quick     # the setting: data, target, prior, evaluators
    nice -n 10 python bench/search_omniglot.py out/demo-quick --out out/search-omniglot

The setting is `mishield demo --dataset omniglot --quick`'s (mishield/demo.py): its private
characters (train and validation drawers), its trained target `original.pt`, its DCGAN prior and
its two evaluation models. The search (`mishield.search_defences`, docs/search.md) runs the
`quick` grid (RoLSS and SSF k = 0.2, each alone and with negative LS + erasing) with the demo's
training recipe (glyph augmentation, batch 32, its learning rate), `--search-epochs` per candidate,
the search's `ci` audit with the demo's final selection for characters (no mirror, 80-100 %
crops) and the demo's step budget, and `--epochs` of full fine-tuning for the pick, then the second
audit. Prints the candidates' table and writes OUT.json: the search's own document plus the wall
and CPU seconds, the torch threads and the load average before and after (the machine is shared:
the CPU time of the process is what an idle machine would need, roughly).

The library call is what `mishield harden original.pt --data private/ --search --prior prior.safetensors
--eval-model eval.pt --eval-model eval2.pt --grid quick --max-acc-drop 0.05 --out hardened.pt`
does, with the training augmentation and the character final selection that the command line does
not set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("demo", type=Path, help="a `mishield demo --dataset omniglot --quick` folder")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "search-omniglot")
    ap.add_argument("--search-epochs", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=5, help="the pick's full fine-tuning")
    ap.add_argument("--max-acc-drop", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()

    import torch

    import mishield
    from mishield.audit.config import AuditConfig
    from mishield.demo import BATCH_SIZE, LR, SIZES
    from mishield.hardening import HardenConfig
    from mishield.search import SearchConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    quick = SIZES["omniglot"]["quick"]
    budget = {k: v for k, v in quick["attack"].items() if k in ("iterations", "final_flip", "final_scale", "batch_size")}
    config = SearchConfig(
        base=HardenConfig(epochs=args.epochs, lr=LR, batch_size=BATCH_SIZE, device="cpu", workers=0,
                          augmentation=quick["augmentation"]),
        grid="quick", search_epochs=args.search_epochs, max_acc_drop=args.max_acc_drop,
        audit=AuditConfig.preset("ci", **budget, device="cpu"), overwrite=True)
    args.out.mkdir(parents=True, exist_ok=True)
    load, t0, c0 = os.getloadavg()[0], time.perf_counter(), time.process_time()
    result = mishield.search_defences(args.demo / "original.pt", data=args.demo / "data" / "private",
                                      prior=args.demo / "prior.safetensors",
                                      eval_model=[args.demo / "eval.pt", args.demo / "eval2.pt"],
                                      out=args.out / "hardened.pt", config=config,
                                      log=lambda line: print(line, file=sys.stderr, flush=True))
    doc = {"search": result.to_dict(), "seconds": round(time.perf_counter() - t0, 1),
           "cpu_seconds": round(time.process_time() - c0, 1), "threads": torch.get_num_threads(),
           "load_before": load, "load_after": os.getloadavg()[0],
           "command": " ".join(["python", "bench/search_omniglot.py", *sys.argv[1:]])}
    (args.out / "search-omniglot.json").write_text(json.dumps(doc, indent=1, default=str))
    print(table(result.to_dict()))
    print(f"\n{doc['seconds']} s wall, {doc['cpu_seconds']} s CPU, {doc['threads']} torch threads, "
          f"load {doc['load_before']:.1f} -> {doc['load_after']:.1f}; SVG: {result.files.get('svg')}")


def table(doc: dict) -> str:
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}"

    lines = ["| model | natural acc % | drop, pts | budget | attack acc@1 % [95 %] | paired diff, pts [95 %] |",
             "|---|---|---|---|---|---|"]
    b = doc["baseline"]
    lines.append(f"| original | {pct(b['natural_acc'])} | | | {pct(b['attack_acc1'])} "
                 f"[{pct(b['attack_acc1_ci95'][0])}, {pct(b['attack_acc1_ci95'][1])}] | |")
    rows = [*doc["candidates"], *([{**doc["final"], "name": f"{doc['pick']}, fully fine-tuned"}] if doc.get("final") else [])]
    for c in rows:
        lo, hi = c["attack_acc1_ci95"]
        plo, phi = c["paired_diff_acc1_ci95"]
        name = c["name"] + (" (pick)" if c["name"] == doc["pick"] else "")
        lines.append(f"| {name} | {pct(c['natural_acc'])} | {100 * c['accuracy_drop']:+.1f} | "
                     f"{'within' if c['within_budget'] else 'outside'} | {pct(c['attack_acc1'])} [{pct(lo)}, {pct(hi)}] | "
                     f"{100 * c['paired_diff_acc1']:+.1f} [{100 * plo:+.1f}, {100 * phi:+.1f}] |")
    return "\n".join(lines) + "\n\n" + "\n".join(doc["statements"])


if __name__ == "__main__":
    main()
