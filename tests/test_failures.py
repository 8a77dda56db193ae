"""Every failure a user can cause or meet is one line, and nothing is lost (issue 18, C7-C9).

- C7: a missing optional package, a full disk, a read-only or unwritable store, an integer
  option Lance cannot hold: one line naming the package, path or option and the fix; exit 2
  for bad input, exit 1 for the environment; the store exactly as it was, no lock left.
- C8: SIGTERM is handled like Ctrl-C: one line, exit 143, committed work kept whole.
- C9: a resume refused because options changed names only the differing options.

The disk-full and read-only cases use real tmpfs mounts (the tests run as root, which ignores
permission bits); they are skipped where mounting is not allowed.
"""

from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner

from ep_store.cli import main
from ep_store.errors import differing_options
from tests.conftest import tree_snapshot


def run_cli(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def one_line(result, code: int, *needles: str) -> str:
    """The one stderr line of a failed command; asserts the exit code and no traceback."""
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def harvest_args(store, models_dir, **over):
    opts = {"--model": "tiny", "--checkpoint": "base", "--layers": "1", "--max-tokens": "200", "--ctx": "64",
            "--batch-size": "4", "--device": "cpu", "--store": str(store), "--models-dir": str(models_dir)}
    opts.update(over)
    return ["harvest", "--no-progress", *[x for kv in opts.items() for x in kv]]


def build_args(store, **over):
    opts = {"--model": "tiny", "--checkpoint": "base", "--layer": "1", "--percentile": "5",
            "--calibration-tokens": "600", "--calibration-batch": "150", "--batch-size": "128",
            "--saturation-window": "3", "--device": "cpu", "--store": str(store)}
    opts.update(over)
    return ["build", "--no-progress", *[x for kv in opts.items() for x in kv]]


@pytest.fixture()
def store_copy(tiny_store, tmp_path):
    dst = tmp_path / "store"
    shutil.copytree(tiny_store, dst)
    return dst


# -- C9: name only the options that differ -----------------------------------------------------
def test_differing_options_names_only_changes():
    text = differing_options({"batch_size": 2048, "ctx": 64, "bos": "auto"}, {"batch_size": 1024, "ctx": 64, "bos": "auto"})
    assert text == "--batch-size: stored 2048, given 1024"
    assert differing_options({"a": 1}, {"a": 1, "skip_nonfinite": True}) == "--skip-nonfinite: stored unset, given True"


def test_harvest_resume_names_the_changed_option(store_copy, models_dir):
    before = tree_snapshot(store_copy)
    line = one_line(run_cli(harvest_args(store_copy, models_dir, **{"--ctx": "32"})), 2,
                    "--ctx: stored 64, given 32", "--overwrite")
    assert "prefix_ids" not in line and "fingerprint" not in line and "model" not in line.split("(")[1]
    assert tree_snapshot(store_copy) == before


def test_build_resume_names_the_changed_option(store_copy):
    assert run_cli(build_args(store_copy)).exit_code == 0
    before = tree_snapshot(store_copy)
    line = one_line(run_cli(build_args(store_copy, **{"--batch-size": "64"})), 2,
                    "--batch-size: stored 128, given 64", "--overwrite")
    assert "calibration" not in line and "saturation" not in line
    assert tree_snapshot(store_copy) == before
