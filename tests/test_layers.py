"""The tree is the architecture (issue 19): imports point down only, kernels are pure, modules
and functions stay small enough to read.

The layer rules themselves are import-linter contracts in pyproject.toml; `.ci/run` runs
`lint-imports` too, and this test runs it so README's test command covers it.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

MAX_MODULE_LINES = 410  # "~400" (developers' brief); the one module near it is sae/compare.py
MAX_FUNCTION_LINES = 60


def test_import_contracts_hold():
    lint = shutil.which("lint-imports")
    if lint is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([lint], cwd=ROOT, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_kernels_import_neither_lance_nor_duckdb():
    code = ("import sys, ep_store.kernels.leader, ep_store.kernels.edits, ep_store.kernels.scan; "
            "print(sorted(m for m in ('lance', 'duckdb', 'pyarrow', 'transformers') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"


def python_files():
    return sorted((ROOT / "ep_store").rglob("*.py"))


def test_modules_and_functions_are_small():
    long_modules, long_functions = [], []
    for path in python_files():
        source = path.read_text()
        if len(source.splitlines()) > MAX_MODULE_LINES:
            long_modules.append(f"{path.relative_to(ROOT)} ({len(source.splitlines())} lines)")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                size = node.end_lineno - node.lineno + 1
                if size > MAX_FUNCTION_LINES:
                    long_functions.append(f"{path.relative_to(ROOT)}:{node.name} ({size} lines)")
    assert not long_modules, f"split these modules: {long_modules}"
    assert not long_functions, f"split these functions: {long_functions}"


def test_only_the_store_spells_file_names():
    """No module outside ep_store/store builds a path from a literal .lance or meta.json name
    (the store's layout is known in one place: store/layout.py)."""
    offenders = []
    for path in python_files():
        if path.parent.name == "store":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and (node.value.endswith(".lance") or node.value == "meta.json"):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert not offenders, offenders
