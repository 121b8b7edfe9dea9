"""The masking diagnostics and the default attacks on the demo's real defences and on masked wrappers (issue 20).

    mishield demo --out /tmp/demo-full                  # the models, prior, evaluator and data (docs/demo.md)
    python bench/masking_audit.py /tmp/demo-full --out /tmp/masking-audit --markdown /tmp/masking.md

Protocol: the demo's Fashion-MNIST split (classes 0-4 private, 5-9 public), its undefended target
(`original.pt`), its real defences (`rolss-tts.pt`, `ssf.pt`, and `bido-rolss.pt` when the full demo
made it), and the test suite's masked wrappers around the original (tests/masking.py: a detached
or rounded input, logits x1e3 or x1e-3, a detector of generated images), which give the original's
top-1 on every natural image. ONE audit with the default attacks (ppa and blackbox; with
`--surrogates`, also lomma and transfer, each model's surrogate distilled from the ORIGINAL's soft
outputs on the public images: the wrappers answer natural images as the original does, except the
temperatures, whose surrogates an attacker would distil at their own temperature). It prints per
model the masking diagnostics (gradient norms and zero fractions on real and prior images next to
the reference, determinism, surrogate agreement, the loss curve's drop), each attack's accuracy,
its gain over selection alone and whether it may decide, and the verdict: the measurements behind
docs/audit.md "Masking".
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the masked wrappers the tests use (tests/masking.py)

MODELS = ("original.pt", "rolss-tts.pt", "ssf.pt", "bido-rolss.pt")
WRAPPERS = ("detach", "quantise", "temperature-1e3", "temperature-1e-3", "detector")


def main() -> None:
    import torch

    import mishield
    from mishield.attack.priors import load_prior
    from mishield.audit.config import AuditConfig
    from mishield.audit.loading import NamedModel
    from mishield.audit.runner import AuditRun
    from mishield.data import load_image_folders

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("demo", type=Path, help="a `mishield demo --out` folder")
    parser.add_argument("--out", type=Path, default=Path("/tmp/masking-audit"))
    parser.add_argument("--preset", default="default")
    parser.add_argument("--iterations", type=int, default=None, help="-I (default: the prior's)")
    parser.add_argument("--models", default=",".join(MODELS), help="files of the demo folder; the first is the original")
    parser.add_argument("--wrappers", default=",".join(WRAPPERS))
    parser.add_argument("--surrogates", action="store_true", help="distil a surrogate of the original and run lomma and transfer too")
    parser.add_argument("--surrogate-epochs", type=int, default=10)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()

    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    named = [NamedModel.from_loaded(mishield.load_model(args.demo / m)) for m in args.models.split(",") if (args.demo / m).exists()]
    original = named[0]
    wrapped = [NamedModel(f"original.pt + {w}", copy.deepcopy(_wrappers(original)[w]), original.preprocessing, original.num_classes,
                          {"source": None, "sha256": None, "arch": None, "kind": "module"})
               for w in args.wrappers.split(",") if w]  # fmt: skip
    targets = [*named, *wrapped]
    surrogates = None
    if args.surrogates:
        surrogates = [[_surrogate(args, original)] for _ in targets]
    config = AuditConfig.preset(args.preset, device="cpu", overwrite=True, iterations=args.iterations)
    prior = load_prior(str(args.demo / "prior.safetensors"), target_input_size=original.preprocessing.input_size)
    evaluation = NamedModel.from_loaded(mishield.load_model(args.demo / "eval.pt"))
    data = load_image_folders(args.demo / "data" / "private")
    t1 = time.perf_counter()
    report = AuditRun(targets, [evaluation], data, prior, config, args.out / "audit", surrogates=surrogates).run()
    doc = {"command": " ".join(["python", "bench/masking_audit.py", *sys.argv[1:]]), "surrogate_seconds": t1 - t0,
           "audit_seconds": time.perf_counter() - t1, "attacks": report.options["attacks"], "models": rows(report.to_dict()),
           "hardware": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
           "software": f"Python {platform.python_version()}, torch {torch.__version__}, mishield {mishield.__version__}"}  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc, indent=1))
    if args.markdown:
        args.markdown.write_text(markdown(doc))


def _wrappers(model) -> dict:
    from masking import masked_wrappers

    return masked_wrappers(copy.deepcopy(model.model), model.preprocessing, model.num_classes)


def _surrogate(args, original):
    """The original's surrogate (module, preprocessing), distilled once on the demo's public images."""
    import mishield

    path = args.out / "surrogate-original.pt"
    if not path.exists():
        config = mishield.SurrogateConfig(epochs=args.surrogate_epochs, device="cpu")
        mishield.train_surrogate(args.demo / "original.pt", args.demo / "data" / "public", path, config=config)
    loaded = mishield.load_model(path)
    return loaded.model, loaded.preprocessing


def rows(report: dict) -> list[dict]:
    """Per model: its diagnostics, each attack's figures, the verdict."""
    out = []
    for m in report["models"]:
        k = m["masking"]
        g, r = k["gradient_stats"], k["reference_gradient_stats"]
        attacks = {a["attack"]: {"acc1": a["metrics"]["attack_acc1"], "high": a["metrics"]["attack_acc1_interval"]["high"],
                                 "gain": a["metrics"].get("gain_over_selection_acc1_interval"),
                                 "selection_only": a["metrics"].get("selection_only_acc1"),
                                 "unfiltered": a["metrics"].get("unfiltered_acc1"), "decides": a["decides"],
                                 "verdict": a["verdict"]["status"], "cause": a["verdict"].get("cause")}
                   for a in m["attacks"]}  # fmt: skip
        out.append({"model": m["name"], "natural_acc": m["metrics"]["natural_acc"], "reference": k["reference"],
                    "norm_ratio": {s: _ratio(g[s]["median_norm"], r[s]["median_norm"]) for s in g},
                    "zero_fraction": {s: g[s]["zero_fraction"] for s in g}, "deterministic": k["determinism"]["deterministic"],
                    "surrogate_agreement": k["surrogate_agreement"], "loss_drop": k["loss_drop"],
                    "reference_loss_drop": k["reference_loss_drop"], "signals": k["signals"], "attacks": attacks,
                    "worst_acc1": m["metrics"]["attack_acc1"], "paired": m["metrics"].get("paired_diff_acc1_interval"),
                    "verdict": m["verdict"]["status"], "cause": m["verdict"].get("cause")})  # fmt: skip
    return out


def _ratio(a, b):
    return None if a is None or not b else a / b


def markdown(doc: dict) -> str:
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}"

    def num(v):
        return "n/a" if v is None else f"{v:.3g}"

    attacks = doc["attacks"]
    lines = ["| model | grad. norm × ref. real / prior | zero % real / prior | loss drop % (ref.) | surrogate agr. % nat. / gen. | "
             + " | ".join(f"{a} @1 % (gain over I=0, pts)" for a in attacks) + " | worst @1 %, paired vs original | verdict (cause) |",
             "|---" * (6 + len(attacks)) + "|"]  # fmt: skip
    for r in doc["models"]:
        agr = r["surrogate_agreement"] or {}
        cells = []
        for a in attacks:
            x = r["attacks"][a]
            gain = x["gain"]
            mark = "" if x["decides"] else " (masked)"
            shown = "n/a" if not gain else "{:+.0f} [{:+.0f}, {:+.0f}]".format(*(100 * gain[k] for k in ("estimate", "low", "high")))
            cells.append(f"{pct(x['acc1'])} ({shown}){mark}")
        paired = r["paired"]
        paired_s = "" if not paired else f", {100 * paired['estimate']:+.1f} [{100 * paired['low']:+.1f}, {100 * paired['high']:+.1f}]"
        lines.append(f"| {r['model']} | {num(r['norm_ratio'].get('real'))} / {num(r['norm_ratio'].get('prior'))} | "
                     f"{pct(r['zero_fraction'].get('real'))} / {pct(r['zero_fraction'].get('prior'))} | "
                     f"{pct(r['loss_drop'])} ({pct(r['reference_loss_drop'])}) | "
                     f"{pct(agr.get('natural'))} / {pct(agr.get('generated'))} | " + " | ".join(cells)
                     + f" | {pct(r['worst_acc1'])}{paired_s} | {r['verdict']} ({r['cause']}) |")  # fmt: skip
    lines += ["", f"Audit {doc['audit_seconds']:.0f} s; {doc['hardware']}; {doc['software']}. `{doc['command']}`"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
