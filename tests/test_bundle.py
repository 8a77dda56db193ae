"""``ep publish`` / ``ep pull``: checked bundles that carry dictionaries between stores (issue 21, item 2)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from ep_store.cli.main import main
from ep_store.stages.build import BuildConfig, build
from ep_store.store import Store
from ep_store.store.digest import digest
from tests.conftest import tree_snapshot

KEY = "tiny/base/L2/p5"


@pytest.fixture(scope="module")
def source(tiny_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle") / "store"
    shutil.copytree(tiny_store, root)
    store = Store(root)
    for tokens in (1500, None):  # two builds: two Lance versions and tags travel
        build(BuildConfig("tiny", "base", 2, 5.0, calibration_tokens=1000, calibration_batch=250, batch_size=256,
                          saturation_window=50, max_tokens=tokens, device="cpu"), store, progress=False)
    return store


def rows(done) -> list[dict]:
    """``--format json`` output: one JSON object per line."""
    return [json.loads(line) for line in done.stdout.splitlines()]


def ep(*args):
    done = CliRunner().invoke(main, [str(a) for a in args])
    return done


@pytest.fixture()
def bundle(source, tmp_path):
    done = ep("publish", KEY, "--to", tmp_path / "bundle", "--with-assignments", "--store", source.root)
    assert done.exit_code == 0, done.output
    return tmp_path / "bundle"


def test_publish_pull_query_in_three_commands(source, bundle, tmp_path):
    target = tmp_path / "mine"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert [e["key"] for e in manifest["dictionaries"]] == [KEY]
    card = (bundle / "README.md").read_text()
    assert KEY in card and "theta" in card and "blocks.2.hook_resid_post" in card
    done = ep("pull", bundle, "--store", target)
    assert done.exit_code == 0, done.output
    pulled = Store(target)
    folder = pulled.dictionary_files(pulled.list_dictionaries()[0]).folder
    original = source.dictionary_files(pulled.list_dictionaries()[0]).folder
    assert digest(folder)["digest"] == manifest["dictionaries"][0]["digest"] == digest(original)["digest"]
    stats = ep("stats", KEY, "region_members", "--store", target, "--format", "json")
    assert stats.exit_code == 0, stats.output
    want = ep("stats", KEY, "region_members", "--store", source.root, "--format", "json")
    assert rows(stats) == rows(want) and len(rows(stats)) > 1
    # Versions and tags travel: the first build is there as of its tag, with the same regions.
    meta = json.loads((original / "meta.json").read_text())
    first = meta["history"][0]["tag"]
    for store in (target, source.root):
        old = ep("stats", KEY, "saturation", "--store", store, "--as-of", first, "--format", "json")
        assert old.exit_code == 0, old.output
        assert len(rows(old)) == meta["history"][0]["batches"]
    # The user's own harvest of the same model and hook: ep assign works on the pulled dictionary.
    shutil.copytree(source.root / "activations", target / "activations")
    assert ep("assign", "--dictionary", KEY, "--store", target).exit_code == 0
    sql = ep("sql", "SELECT count(*) AS n FROM exemplars", "--store", target, "--format", "csv")
    assert sql.exit_code == 0 and sql.stdout.splitlines()[1] == str(meta["regions"])


def corrupt_first_data_file(bundle):
    data = sorted((bundle / "dictionaries").rglob("*.lance"))
    return [p for p in data if p.is_file()][0]


@pytest.mark.parametrize("damage", ["flip", "truncate", "remove", "extra", "manifest", "card"])
def test_pull_refuses_a_damaged_bundle_and_changes_nothing(source, bundle, tmp_path, damage):
    target = tmp_path / "mine"
    assert ep("pull", bundle, "--store", target).exit_code == 0  # a store with something in it already
    shutil.rmtree(target / "dictionaries")
    before = tree_snapshot(target)
    victim = corrupt_first_data_file(bundle)
    if damage == "flip":
        raw = bytearray(victim.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        victim.write_bytes(bytes(raw))
    elif damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:-10])
    elif damage == "remove":
        victim.unlink()
    elif damage == "extra":
        (victim.parent / "planted.bin").write_bytes(b"x")
    elif damage == "manifest":
        (bundle / "manifest.json").write_text("{not json")
    else:
        (bundle / "README.md").write_text("edited")
    done = ep("pull", bundle, "--store", target)
    assert done.exit_code == 2, done.output
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert tree_snapshot(target) == before


def test_refusals_of_publish_and_pull(source, bundle, tmp_path):
    target = tmp_path / "mine"
    assert ep("pull", bundle, "--store", target).exit_code == 0
    before = tree_snapshot(target)
    for args, needle in ((("pull", bundle, "--store", target), "already has"),
                         (("pull", bundle, "tiny/base/L2/p9", "--store", target), "holds no dictionary"),
                         (("pull", tmp_path / "nowhere", "--store", target), "not a folder"),
                         (("pull", "hf://datasets/onlyorg", "--store", target), "hf://datasets/ORG/REPO"),
                         (("publish", KEY, "--to", bundle, "--store", source.root), "exists"),
                         (("publish", "tiny/base/L2/p9", "--to", tmp_path / "b2", "--store", source.root), "no dictionary")):
        done = ep(*args)
        assert done.exit_code == 2 and needle in done.stderr and "Traceback" not in done.stderr, (args, done.output)
    assert tree_snapshot(target) == before and not (tmp_path / "b2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folders left
    assert ep("pull", bundle, "--store", target, "--overwrite").exit_code == 0


def test_pull_from_the_hub_offline_fails_in_one_line(tmp_path, monkeypatch):
    """No hub here: the download fails, in one line, and the store is not created."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    done = ep("pull", "hf://datasets/someone/ep-dictionaries/gemma", "--store", tmp_path / "s")
    assert done.exit_code != 0 and "download of hf://datasets/someone/ep-dictionaries/gemma failed" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "s" / "dictionaries").exists()


def rewrite_manifest(bundle, change):
    manifest = json.loads((bundle / "manifest.json").read_text())
    change(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("lie", ["escape", "absolute", "key", "twice", "empty", "top_level_file"])
def test_pull_refuses_a_bundle_that_lies_and_writes_nowhere(source, bundle, tmp_path, lie):
    """A manifest whose folder points outside the key's place (``..``, an absolute path), that
    renames the dictionary, lists it twice or not at all, or a file nowhere in the manifest:
    exit 2 in one line, nothing written anywhere, not even the store's root (helper's findings)."""
    entry = lambda m: m["dictionaries"][0]  # noqa: E731
    if lie == "escape":
        rewrite_manifest(bundle, lambda m: entry(m).update(folder="../../escaped/p5"))
    elif lie == "absolute":
        rewrite_manifest(bundle, lambda m: entry(m).update(folder=str(tmp_path / "abs" / "p5")))
    elif lie == "key":
        rewrite_manifest(bundle, lambda m: entry(m).update(key="other/base/L2/p5",
                                                           folder="dictionaries/other/base/L2/p5"))
        shutil.move(bundle / "dictionaries" / "tiny", bundle / "dictionaries" / "other")
    elif lie == "twice":
        rewrite_manifest(bundle, lambda m: m["dictionaries"].append(entry(m)))
    elif lie == "empty":
        rewrite_manifest(bundle, lambda m: m.update(dictionaries=[]))
    else:
        (bundle / "NOTES.txt").write_text("planted")
    before = tree_snapshot(tmp_path)
    done = ep("pull", bundle, "--store", tmp_path / "new_store")
    assert done.exit_code == 2, done.output
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert tree_snapshot(tmp_path) == before and not (tmp_path / "new_store").exists()


def test_pull_is_refused_while_another_writer_holds_the_key(source, bundle, tmp_path):
    """The target's writer lock is taken before the existence check (two pulls at once cannot
    both install: the second is refused), and a pull leaves no staging folder behind."""
    target = Store(tmp_path / "mine")
    folder = target.dictionary_files(pulled_key()).folder
    with target.lock(folder, "another pull"):  # held by this process; the pull runs in another
        done = subprocess.run([sys.executable, "-m", "ep_store", "pull", str(bundle), "--store", str(target.root)],
                              capture_output=True, text=True)
    assert done.returncode == 2 and "being written by another process" in done.stderr, done.stderr
    assert not folder.exists()
    assert ep("pull", bundle, "--store", target.root).exit_code == 0
    assert not (target.root / ".pull").exists()


def pulled_key():
    from ep_store.keys import DictionaryKey

    return DictionaryKey.parse(KEY)


def test_publish_refuses_other_hub_forms_and_dedupes_keys(source, tmp_path):
    for dest in ("hf://models/x/y", "hf:/datasets/x/y", "ftp://host/x"):
        done = ep("publish", KEY, "--to", dest, "--store", source.root)
        assert done.exit_code == 2 and "hf://datasets/ORG/REPO" in done.stderr, done.output
    assert not (tmp_path / "hf:").exists() and not list(tmp_path.iterdir())
    done = ep("publish", KEY, KEY, "--to", tmp_path / "b", "--store", source.root)
    assert done.exit_code == 0, done.output
    assert len(json.loads((tmp_path / "b" / "manifest.json").read_text())["dictionaries"]) == 1
    assert (tmp_path / "b").stat().st_mode & 0o055 == 0o055  # readable like any folder, not mkdtemp's 0700


def test_object_store_round_trip_through_a_file_uri(source, tmp_path):
    """An object-store URI (issue 21, item 2), here ``file://`` (no network): publish uploads the
    checked bundle through Arrow's filesystems, pull downloads and checks it like a folder."""
    uri = (tmp_path / "bucket" / "ep" / "tiny").as_uri()
    done = ep("publish", KEY, "--to", uri, "--store", source.root)
    assert done.exit_code == 0, done.output
    assert (tmp_path / "bucket" / "ep" / "tiny" / "manifest.json").is_file()
    again = ep("publish", KEY, "--to", uri, "--store", source.root)
    assert again.exit_code == 2 and "already exists" in again.stderr
    target = tmp_path / "mine"
    pulled = ep("pull", uri, "--store", target)
    assert pulled.exit_code == 0, pulled.output
    key = pulled_key()
    manifest = json.loads((tmp_path / "bucket" / "ep" / "tiny" / "manifest.json").read_text())
    assert digest(Store(target).dictionary_files(key).folder)["digest"] == manifest["dictionaries"][0]["digest"]
    missing = ep("pull", (tmp_path / "nowhere").as_uri(), "--store", tmp_path / "other")
    assert missing.exit_code == 2 and "holds no bundle" in missing.stderr
    assert not (tmp_path / "other").exists()
