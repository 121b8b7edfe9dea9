"""PPA vs the adaptive LOMMA-style attack on an undefended target and its RoLSS-hardened copy.

    mishield demo --out /tmp/demo-full              # the models, prior, evaluator and data (docs/demo.md)
    python bench/adaptive_attack.py /tmp/demo-full --out /tmp/adaptive --seeds 2 --markdown /tmp/adaptive.md

Protocol: the demo's Fashion-MNIST split (classes 0-4 private, 5-9 public), its undefended target
(`original.pt`) and RoLSS + TTS copy (`rolss-tts.pt`), its DCGAN prior and evaluation model. For
each model one surrogate (default torchvision ResNet-18: skip connections, the adaptive case) is
distilled from the model's soft outputs on the PUBLIC images (`mishield.train_surrogate`); then ONE
`mishield.audit` call runs `ppa` and `lomma` on both models with the default attack preset, so each
row's paired difference is against the undefended model under the same attack, pool and crops.
`--models` picks other files of the folder, e.g. `--models seed0-none.pt seed0-RoLSS.pt` in
bench/privacy_tradeoff.py's --out (the same data/, prior.safetensors and eval.pt layout).
The question (issue 12): does RoLSS's advantage under PPA survive an attacker who optimises
through surrogates that have the skip connections RoLSS removed?
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = ("original.pt", "rolss-tts.pt")


def main() -> None:
    import torch

    import mishield

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("demo", type=Path, help="a `mishield demo --out` folder (or bench/privacy_tradeoff.py's --out)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="model files in that folder; the first is the baseline")
    parser.add_argument("--out", type=Path, default=Path("/tmp/adaptive"))
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--surrogate-arch", default="torchvision:resnet18")
    parser.add_argument("--surrogate-epochs", type=int, default=10)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()

    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    models = [args.demo / m for m in args.models]
    surrogates, agreement = [], {}
    for model in models:
        path = args.out / f"surrogate-{model.stem}.pt"
        if not path.exists():
            config = mishield.SurrogateConfig(arch=args.surrogate_arch, epochs=args.surrogate_epochs, device="cpu")
            result = mishield.train_surrogate(model, args.demo / "data" / "public", path, config=config)
            agreement[model.name] = result.agreement
        else:
            agreement[model.name] = mishield.load_model(path).recipe["surrogate"]["agreement"]
        surrogates.append(path)
    t1 = time.perf_counter()
    config = mishield.AuditConfig.preset(args.preset, attacks="ppa,lomma", seeds=args.seeds, device="cpu", overwrite=True)
    report = mishield.audit(models, data=args.demo / "data" / "private", prior=args.demo / "prior.safetensors",
                            eval_model=args.demo / "eval.pt", config=config, surrogates=surrogates, out=args.out / "audit")
    doc = {"command": " ".join(["python", "bench/adaptive_attack.py", *sys.argv[1:]]), "surrogate_agreement": agreement,
           "surrogate_seconds": t1 - t0, "audit_seconds": time.perf_counter() - t1, "rows": rows(report.to_dict()),
           "hardware": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
           "software": f"Python {platform.python_version()}, torch {torch.__version__}, mishield {mishield.__version__}"}
    (args.out / "results.json").write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc, indent=1))
    if args.markdown:
        args.markdown.write_text(markdown(doc))


def rows(report: dict) -> list[dict]:
    """One row per model x attack, then the model's worst case."""
    out = []
    for m in report["models"]:
        for r in [*m["attacks"], {"attack": f"worst ({m['attack']})", "metrics": m["metrics"], "verdict": m["verdict"]}]:
            s = r["metrics"]
            out.append({"model": m["name"], "attack": r["attack"], "natural_acc": s["natural_acc"], "attack_acc1": s["attack_acc1"],
                        "interval": [s["attack_acc1_interval"]["low"], s["attack_acc1_interval"]["high"]],
                        "paired_diff": s.get("paired_diff_acc1"),
                        "paired_interval": None if not s.get("paired_diff_acc1_interval") else
                        [s["paired_diff_acc1_interval"]["low"], s["paired_diff_acc1_interval"]["high"]],
                        "selection_only_acc1": s.get("selection_only_acc1"), "target_confidence": s["target_confidence"],
                        "knn_dist": s["knn_dist"], "verdict": r["verdict"]["status"]})  # fmt: skip
    return out


def markdown(doc: dict) -> str:
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}"

    lines = ["| model | attack | natural acc % | attack acc@1 % [95 % CI] | paired diff vs original, pts [95 % CI] | I=0 % | target conf. | KNN dist |",
             "|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        paired = "n/a" if r["paired_diff"] is None else \
            f"{100 * r['paired_diff']:+.1f} [{100 * r['paired_interval'][0]:+.1f}, {100 * r['paired_interval'][1]:+.1f}]"
        lines.append(f"| {r['model']} | {r['attack']} | {pct(r['natural_acc'])} | {pct(r['attack_acc1'])} "
                     f"[{pct(r['interval'][0])}, {pct(r['interval'][1])}] | {paired} | {pct(r['selection_only_acc1'])} | "
                     f"{r['target_confidence']:.2f} | {r['knn_dist']:.1f} |")
    agree = ", ".join(f"{k}: {100 * v:.1f} %" for k, v in doc["surrogate_agreement"].items())
    lines += ["", (f"Surrogate agreement with its target on held-out public images: {agree}. "
                   f"Surrogates {doc['surrogate_seconds']:.0f} s, audit {doc['audit_seconds']:.0f} s; {doc['hardware']}; {doc['software']}.")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
