"""Imports point one way (DESIGN.md): features -> training -> run directory -> serving, recsys/ beneath all.

Each check imports a module in a fresh interpreter and looks at what else got loaded, so a lazy
import inside a function that runs at import time counts too.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORE_MODULES = sorted(f"recsys.{m.name}" for m in pkgutil.iter_modules([str(REPO / "recsys")]) if m.name not in ("cli", "__main__"))


FEATURE_MODULES = sorted(f"features.{m.name}" for m in pkgutil.iter_modules([str(REPO / "features")]))
# What each check imports; the interpreters start together (each spends seconds importing torch).
IMPORTS = {"serving": ("serving.app",), "cli": ("recsys.cli",), "core": tuple(CORE_MODULES), "features": tuple(FEATURE_MODULES)}


def start_import(modules: tuple[str, ...], path: list[str] | None = None) -> subprocess.Popen:
    """A new interpreter that imports ``modules`` and prints the names then in ``sys.modules``."""
    prefix = f"sys.path[:0] = {path!r}; " if path else ""
    code = "import json, sys; " + prefix + f"import {', '.join(modules)}; print(json.dumps(sorted(sys.modules)))"
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def loaded(proc: subprocess.Popen) -> list[str]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def loaded_by():
    procs = {name: start_import(modules) for name, modules in IMPORTS.items()}
    return {name: loaded(proc) for name, proc in procs.items()}


def of_packages(modules: list[str], packages: tuple[str, ...]) -> list[str]:
    return [m for m in modules if m.split(".")[0] in packages]


def test_the_service_loads_no_training_code(loaded_by):
    assert "serving.app" in loaded_by["serving"]
    assert of_packages(loaded_by["serving"], ("training",)) == []


def test_the_command_line_loads_no_job_until_a_command_runs(loaded_by):
    assert of_packages(loaded_by["cli"], ("features", "training", "serving")) == []


def test_the_shared_core_imports_none_of_the_layers_above_it(loaded_by):
    assert len(CORE_MODULES) > 5 and "recsys.model" in loaded_by["core"]  # the listing found the core's modules
    assert of_packages(loaded_by["core"], ("features", "training", "serving")) == []


def test_features_import_neither_training_nor_serving(loaded_by):
    assert "features.pipeline" in loaded_by["features"]
    assert of_packages(loaded_by["features"], ("training", "serving")) == []


def test_the_check_sees_a_forbidden_import(tmp_path):
    """The check itself can fail: a module that imports training is caught."""
    (tmp_path / "leaky_core.py").write_text("import training.epochs\n")
    assert "training.epochs" in of_packages(loaded(start_import(("leaky_core",), [str(tmp_path), str(REPO)])), ("training",))
