"""The public Python API: the README's example runs, every exported name resolves, importing
mishield stays torch-free, and the import graph has no cycles and no library -> CLI edges."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from attack_support import noise_splits

import mishield

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mishield"


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Python API", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "README's Python API section has no python code block"
    return match.group(1)


def test_readme_python_example_runs(tmp_path):
    # As a user runs it: a fresh interpreter, in an empty directory.
    (tmp_path / "example.py").write_text(_readme_example(), encoding="utf-8")
    proc = subprocess.run([sys.executable, "example.py"], capture_output=True, text=True, check=False, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = proc.stdout
    assert "the methods change" in printed and "tts natural accuracy" in printed

    back = mishield.load_model(tmp_path / "hardened.safetensors")
    assert back.num_classes == 3 and back.recipe["training"]["classes"] == ["0_tshirt_top", "1_trouser", "7_sneaker"]
    assert set(back.recipe["metrics"]) == {"natural_acc_before", "natural_acc_after_surgery", "natural_acc_after"}
    assert [s["method"] for s in back.recipe["surgery"]] == ["rolss"]
    ssf = mishield.load_model(tmp_path / "ssf.pt")
    assert ssf.recipe["surgery"][0]["alpha"] == 0.2
    assert (tmp_path / "hardened.onnx").stat().st_size > 0
    assert not (tmp_path / "hardened.safetensors.train-state").exists()


def test_harden_result_matches_the_cli_json_and_errors_name_parameters(tmp_path):
    import torch

    loaded = mishield.load_model("timm:test_resnet", num_classes=3, input_size=32)
    result = mishield.harden(loaded, method="ssf", alpha=0.5)  # surgery only, nothing written
    assert isinstance(result, mishield.HardenResult) and result.out is None and result.training is None
    doc = result.to_dict()
    assert set(doc) == {"out", "method", "alpha", "selection", "sites", "dropped_parameters", "surgery_seconds"}
    assert doc["alpha"] == 0.5 and doc["sites"] == result.plan.selected
    x = torch.randn(2, 3, 32, 32)
    assert result.model(x).shape == (2, 3)

    with pytest.raises(mishield.UsageError, match=r"^`alpha` applies to `method` ssf only"):
        mishield.harden(loaded, method="rolss", alpha=0.3)
    with pytest.raises(mishield.UsageError, match=r"^`epochs` needs training data; pass `data`"):
        mishield.harden(loaded, epochs=3)
    with pytest.raises(mishield.UsageError, match="`schedule` must be tts or finetune"):
        mishield.harden(loaded, data=tmp_path, schedule="sgd")
    with pytest.raises(mishield.UsageError, match="`alpha` must lie in"):
        mishield.harden(loaded, method="ssf", alpha=1.5)


def test_cli_rewrites_parameter_names_as_flags():
    from mishield.cli.options import flag_for, flags_in_errors
    from mishield.errors import BadInputError

    def library(val_data=None, val_fraction=None, keep=None):
        pass

    assert flag_for("stage1_epochs") == "--stage1-epochs" and flag_for("models") == "MODEL"
    with pytest.raises(BadInputError) as info, flags_in_errors(library):
        raise BadInputError("`val_data` and `val_fraction` both choose; `keep`, `num_classes`; `none` and `z_dim` stay.")
    assert str(info.value) == ("--val-data and --val-fraction both choose; -K/--keep, --num-classes; "
                               "`none` and `z_dim` stay.")
    assert info.value.exit_code == 3


def test_help_lists_the_api_and_every_name_resolves():
    names = [n for n in mishield.__all__ if n != "__version__"]
    assert mishield.__all__ == sorted(mishield.__all__)
    assert set(names) == set(mishield._API)
    for name in ("harden", "HardenResult", "audit", "AuditReport", "inspect_model", "load_model", "save_model",
                 "plan_surgery", "apply_plan", "export_onnx", "MishieldError", "PrivacyGateError"):
        assert name in names
    for name in names:
        assert getattr(mishield, name) is not None, name
    proc = subprocess.run([sys.executable, "-c", "import mishield; help(mishield)"], capture_output=True, text=True,
                          check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PAGER": "cat", "TERM": "dumb"})
    assert "harden" in proc.stdout and "AuditReport" in proc.stdout and "inspect_model" in proc.stdout
    with pytest.raises(AttributeError):
        mishield.no_such_name  # noqa: B018


def test_import_and_cli_registration_leave_torch_out():
    code = (
        "import sys, json, mishield, mishield.cli as cli\n"
        "cli._register()\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'commands': [c.name for c in cli.app.registered_commands]}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    doc = json.loads(proc.stdout)
    assert {"inspect", "harden", "export", "audit"} <= set(doc["commands"])
    assert doc["torch"] is False


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """Every mishield module `path` imports, at module level or inside functions."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports pkg.mod where that is a module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            # `import a.b.c` runs a, a.b and a.b.c: the deepest known module stands for the edge
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != module:
                found.add(t)
    return found


def _import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(files)
    return {m: _imports(p, m, known) for m, p in files.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_import_graph_has_no_cycles_and_layers_point_down():
    graph = _import_graph()
    assert "mishield.hardening" in graph and "mishield.audit.runner" in graph["mishield.cli.audit_cmd"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    upward = sorted(f"{m} -> {n}" for m, deps in graph.items() if not m.startswith("mishield.cli") and m != "mishield.__main__"
                    for n in deps if n == "mishield.cli" or n.startswith("mishield.cli."))
    assert not upward


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for n in graph.get(todo.pop(), ()):
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return seen


def test_the_attack_engine_imports_neither_the_audit_nor_the_trainers():
    # One concept per package (docs/architecture.md §1): the engine is driven by the audit, never the reverse.
    graph = _import_graph()
    engine = [m for m in graph if m == "mishield.attack" or m.startswith("mishield.attack.")]
    assert "mishield.attack.engine" in engine
    for module in engine:
        above = sorted(n for n in _reachable(graph, module)
                       if n.split(".")[:2] in (["mishield", "audit"], ["mishield", "training"], ["mishield", "hardening"]))
        assert not above, f"{module} reaches {above}"
    # and the check sees a real edge: the audit does import the engine
    assert "mishield.attack.engine" in _reachable(graph, "mishield.audit.runner")


def test_cycle_finder_finds_a_function_level_cycle(tmp_path):
    # The walk above must see imports inside functions, or the test would pass vacuously.
    pkg = tmp_path / "mishield"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from mishield import b\n")
    (pkg / "b.py").write_text("import mishield.a\n")
    files = {"mishield": pkg / "__init__.py", "mishield.a": pkg / "a.py", "mishield.b": pkg / "b.py"}
    graph = {m: _imports(p, m, set(files)) for m, p in files.items()}
    assert graph["mishield.a"] == {"mishield.b"} and graph["mishield.b"] == {"mishield.a"}
    assert _cycle(graph) in (["mishield.a", "mishield.b", "mishield.a"], ["mishield.b", "mishield.a", "mishield.b"])


def test_audit_returns_the_report_object_it_writes(tmp_path):
    import torch

    noise_splits(tmp_path / "data", train=4, val=2)
    torch.manual_seed(0)
    target = mishield.load_model("attack_support:tiny_resnet", num_classes=3, input_size=16)
    config = mishield.AuditConfig.preset(
        "default", samples=6, candidates=2, iterations=1, keep=1, final_augmentations=1, batch_size=6, classes="0,2",
        device="cpu", load_options={"num_classes": 3, "input_size": 16},
        allow_weak_evaluator=True,  # random evaluator on random images: a smoke run, which may not be gated
    )
    report = mishield.audit(
        [target, "attack_support:tiny_resnet"], data=tmp_path / "data", prior="none",
        eval_model=mishield.load_model("attack_support:small_plain_cnn", num_classes=3, input_size=16),
        config=config, out=tmp_path / "out",
    )
    assert isinstance(report, mishield.AuditReport) and isinstance(report.models[0], mishield.ModelAudit)
    assert report.classes == [0, 2] and [m.metrics["n"] for m in report.models] == [2, 2]
    assert report.models[0].delta is None and report.models[1].delta is not None
    assert report.gate is None and report.passed  # no gate on a smoke run (the gate: tests/audit/test_audit_fmnist.py)
    assert any("below the floor" in w for w in report.warnings)
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved == {k: v for k, v in report.to_dict().items() if k != "files"}
    assert mishield.AuditReport.from_dict(saved).to_dict() == saved
    assert set(report.files) == {"json", "html", "grid0", "grid1"}

    with pytest.raises(mishield.UsageError, match="`max_attack_acc` is a fraction"):
        mishield.AuditConfig(max_attack_acc=40)
    with pytest.raises(mishield.UsageError, match="cannot be combined with the `max_attack_acc` gate"):
        config.replace(max_attack_acc=0.5)


def test_the_former_keyword_form_still_works_with_a_deprecation_warning(tmp_path):
    from mishield.audit.config import from_keywords

    old = {"preset": "ci", "attack": {"samples": 50, "lr": 0.01}, "max_attack_acc": 0.4, "seeds": 2, "attacks": "ppa,lomma",
           "classes": [0, 2], "device": "cpu", "load_options": {"arch": "timm:test_resnet"}}
    config = from_keywords(old)
    assert config == mishield.AuditConfig.preset("ci", samples=50, lr=0.01, max_attack_acc=0.4, seeds=2, attacks=("ppa", "lomma"),
                                                 classes=(0, 2), device="cpu", load_options={"arch": "timm:test_resnet"})
    assert config.attack.samples == 50 and config.attack.candidates == 16 and config.attack.preset == "ci"
    blocker = tmp_path / "report"
    blocker.write_text("not a folder")
    with pytest.warns(DeprecationWarning, match="config=AuditConfig"), pytest.raises(mishield.UsageError):
        mishield.audit("m.pt", data=tmp_path, prior=None, eval_model="e.pt", out=blocker, preset="ci")
    with pytest.raises(mishield.UsageError, match="not both"):
        mishield.audit("m.pt", data=tmp_path, prior=None, eval_model="e.pt", config=config, preset="ci")
    with pytest.raises(mishield.UsageError, match="unexpected keyword argument.*bogus"):
        mishield.audit("m.pt", data=tmp_path, prior=None, eval_model="e.pt", bogus=1)
    with pytest.warns(DeprecationWarning, match="config=HardenConfig"):
        result = mishield.harden("timm:test_resnet", method="ssf", alpha=0.5, load_options={"num_classes": 3, "input_size": 32})
    assert result.plan.alpha == 0.5 and result.plan.method == "ssf"
    with pytest.raises(mishield.UsageError, match="unexpected keyword argument.*epoch\\b"):
        mishield.harden("timm:test_resnet", epoch=3)


def test_mishield_audit_is_callable_whatever_was_imported_first():
    # `mishield.audit` is the audit package and the audit call at once (mishield/audit/__init__.py).
    code = ("import mishield.audit.report, mishield, sys\n"
            "print(callable(mishield.audit), mishield.audit is sys.modules['mishield.audit'], 'torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.stdout.split() == ["True", "True", "True"]
    lazy_code = "import mishield, sys; from mishield.audit import AuditConfig; print(callable(mishield.audit), 'torch' in sys.modules)"
    lazy = subprocess.run([sys.executable, "-c", lazy_code],
                          capture_output=True, text=True, check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert lazy.stdout.split() == ["True", "False"]


def test_no_citation_of_a_file_outside_the_repository():
    # Design notes live in docs/architecture.md; a citation of a file nobody can open helps no one.
    tracked = subprocess.run(["git", "ls-files"], capture_output=True, text=True, check=True, cwd=ROOT).stdout.split()
    offenders = [
        path for path in tracked
        if path.endswith((".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".txt")) and path != "tests/test_api.py"
        and "DESIGN.md" in (ROOT / path).read_text(encoding="utf-8", errors="replace")
    ]
    assert not offenders
    assert (ROOT / "docs" / "architecture.md").is_file()
