"""The benchmark scripts still import: a moved library name breaks them silently otherwise (they
run by hand, not in CI). Each script's top level (its imports) runs here; `main()` does not."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

BENCH = sorted((Path(__file__).resolve().parents[1] / "bench").glob("*.py"))


@pytest.mark.parametrize("script", BENCH, ids=[p.name for p in BENCH])
def test_benchmark_script_imports(script):
    namespace = runpy.run_path(str(script), run_name="bench_import_check")
    assert callable(namespace.get("main")), f"{script.name} has no main()"
