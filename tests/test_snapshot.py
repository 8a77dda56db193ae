"""Issue 18, A: what belongs together is read together (dictionary snapshots), and a rerun or a
continued build changes nothing a fresh build would not."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from ep_store.analysis.search_index import load_regions
from ep_store.cli.main import main
from ep_store.errors import UsageError
from ep_store.keys import DictionaryKey
from ep_store.sql.db import StoreDB, ask
from ep_store.stages.build import BuildConfig, build, resume_point
from ep_store.stages.dictionary import Dictionary
from ep_store.store.core import Store
from ep_store.store.digest import digests
from tests.test_cli_errors import assert_refused

KEY = DictionaryKey("tiny", "base", 2, 5.0)
GROW = DictionaryKey("grow", "base", 2, 5.0)


@pytest.fixture()
def store(tiny_store, tmp_path):
    shutil.copytree(tiny_store, tmp_path / "store")
    return Store(tmp_path / "store")


def cfg(key=KEY, **over):
    base = dict(model=key.model, checkpoint=key.checkpoint, layer=key.layer, percentile=key.percentile,
                calibration_tokens=1000, calibration_batch=250, batch_size=256, saturation_window=50, device="cpu")
    base.update(over)
    return BuildConfig(**base)


def cli(*args):
    return CliRunner().invoke(main, [*args])


def meta_of(store, key):
    return store.read_json(store.dictionary_dir(key) / "meta.json")


def grown_once(store, rows: int, into: Store | None = None) -> None:
    """Rows [0, rows) of tiny/base/L2 appended to grow/base/L2 (of ``into``), after those it holds."""
    into = into or store
    source = store.read_table(store.activation_path(KEY.activations))
    path = into.activation_path(GROW.activations)
    have = into.info(path).rows if into.exists(path) else 0
    into.append_activations(GROW.activations, source.slice(have, rows - have), {})


# -- A1: one snapshot per dictionary at a tag ------------------------------------------------------
def test_as_of_reads_the_assignments_of_that_build(store):
    build(cfg(max_tokens=1000), store, progress=False)
    small = meta_of(store, KEY)
    build(cfg(), store, progress=False)
    latest = meta_of(store, KEY)
    assert latest["regions"] > small["regions"]
    db = StoreDB(store, "tokens-1000")
    members = ask(db, KEY, "region_members").to_pydict()
    # Old code: assignments of the latest build, with region ids the tagged build never had.
    assert max(members["region_id"]) < small["regions"]
    assert sum(members["assigned_tokens"]) == 3000
    row = db.query("SELECT regions, tokens, stop_reason, lance_version FROM dictionaries").to_pylist()[0]
    assert row == {"regions": small["regions"], "tokens": 1000, "stop_reason": "max_tokens", "lance_version": 1}
    sat = ask(db, KEY, "saturation").to_pydict()
    assert sat["new_regions"] == small["saturation_curve"] and max(sat["tokens"]) == 1000
    # Every reader agrees: the Python API at the tag and by version number.
    for as_of in ("tokens-1000", 1):
        d = Dictionary.load(store, KEY, as_of=as_of)
        assert len(d) == small["regions"] and d.meta["tokens"] == 1000
        assert d.meta["saturation_curve"] == small["saturation_curve"]
        assert (d.snapshot.exemplars_version, d.snapshot.assignments_version) == (1, 1)
        assert d.snapshot.activations_version == small["activations"]["version"] and "builder" not in d.meta
    snap = store.dictionary_snapshot(KEY)
    assert (snap.exemplars_version, snap.assignments_version, snap.meta["tokens"]) == (2, 2, 3000)
    # The latest assignments still see every region of the latest build.
    latest_members = ask(StoreDB(store), KEY, "region_members").to_pydict()
    assert max(latest_members["region_id"]) >= small["regions"]


def test_no_assignments_for_a_build_is_refused_in_one_line(store):
    build(cfg(max_tokens=1000), store, assign=False, progress=False)
    build(cfg(layer=1), store, progress=False)  # another dictionary, assigned
    build(cfg(), store, progress=False)
    root = str(store.root)
    result = cli("stats", str(KEY), "region_members", "--as-of", "tokens-1000", "--store", root)
    assert_refused(result, "tiny/base/L2/p5 at tokens-1000 (exemplars version 1) has no assignments")
    out = store.root.parent / "report"
    assert_refused(cli("report", "dictionary", str(KEY), "--out", str(out), "--as-of", "tokens-1000", "--store", root),
                   "has no assignments")
    assert not out.exists()
    # What the tagged build did publish is still there.
    ok = cli("stats", str(KEY), "saturation", "--as-of", "tokens-1000", "--store", root, "--format", "json")
    assert ok.exit_code == 0, ok.output
    # A latest build whose assignments were not rewritten is refused too (old code: stale rows).
    grown_once(store, 1700)
    build(cfg(key=GROW), store, progress=False)
    grown_once(store, 3000)
    build(cfg(key=GROW), store, assign=False, progress=False)
    assert_refused(cli("stats", str(GROW), "region_members", "--store", root),
                   "were written from exemplars version 1, not the published 2; run: ep assign")
    # Queries about other dictionaries never read that part.
    other = cli("stats", "tiny/base/L1/p5", "region_members", "--store", root, "--format", "json")
    assert other.exit_code == 0, other.output
    d = Dictionary.load(store, GROW)
    regions, why = load_regions(store, d, 3000, store.info(store.activation_path(GROW.activations)).version)
    assert regions is None and "run: ep assign" in why


def test_unknown_tag_is_refused(store):
    build(cfg(max_tokens=1000), store, progress=False)
    with pytest.raises(UsageError, match="no published version or tag 'tokens-5'"):
        Dictionary.load(store, KEY, as_of="tokens-5")
    assert_refused(cli("stats", str(KEY), "saturation", "--as-of", "tokens-5", "--store", str(store.root)),
                   "no dictionary has version or tag")


# -- A2: reruns write nothing, continued builds equal fresh ones ----------------------------------
@pytest.mark.parametrize("window", [1, 50])
def test_rerun_of_a_finished_build_writes_nothing(store, window):
    # Old code, window 1: the rerun closed the partial last batch again (a 0-region batch past the
    # stream's end), said saturated and published version 2 with the tag moved to it.
    first = build(cfg(saturation_window=window), store, progress=False)
    folder = store.dictionary_dir(KEY)
    assert first["stop_reason"] == "end_of_stream" and first["tokens"] == 3000  # 3000 = 11 * 256 + 184
    before = (meta_of(store, KEY), store.versions(folder / "exemplars.lance"), digests([folder], None))
    again = build(cfg(saturation_window=window), store, progress=False)
    assert again["unchanged"] and again["version"] == first["version"] and "assign" not in again
    after = (meta_of(store, KEY), store.versions(folder / "exemplars.lance"), digests([folder], None))
    assert after == before
    meta = before[0]
    assert meta["tags"] == {"tokens-3000": 1} and len(meta["saturation_curve"]) == 12
    assert sum(meta["saturation_curve"]) == meta["regions"]


@pytest.mark.parametrize(("percentile", "window"), [(5.0, 1), (5.0, 50), (60.0, 1)])
def test_continued_build_after_growth_equals_fresh(store, tmp_path, percentile, window):
    # p60 saturates at 768 tokens: a saturated build stays stopped (a fresh build of the longer
    # stream under the same command stops there too); p5 runs to the end of the stream.
    command = cfg(key=GROW, percentile=percentile, saturation_window=window)
    grown_once(store, 1700)  # 1700 = 6 * 256 + 164: the first build stops inside batch 6
    first = build(command, store, progress=False)
    build(command, store, progress=False)  # a rerun in between changes nothing
    grown_once(store, 3000)
    grown = build(command, store, progress=False)
    key = command.key

    fresh_store = Store(tmp_path / "fresh")
    grown_once(store, 3000, into=fresh_store)
    fresh = build(command, fresh_store, progress=False)
    for field in ("regions", "tokens", "stop_reason", "tag"):
        assert grown[field] == fresh[field], field
    if first["stop_reason"] == "saturated":  # the same command stops there on any longer stream
        assert grown["unchanged"] and grown["tokens"] == first["tokens"]
    else:
        assert first["stop_reason"] == "end_of_stream" and grown["tokens"] == 3000
    a, b = meta_of(store, key), meta_of(fresh_store, key)
    for field in ("saturation_curve", "stop_reason", "tokens", "regions", "builder", "theta", "center"):
        assert a[field] == b[field], field
    ta = store.read_table(store.dictionary_dir(key) / "exemplars.lance", version=a["exemplars_version"])
    tb = fresh_store.read_table(fresh_store.dictionary_dir(key) / "exemplars.lance")
    assert ta.equals(tb)  # every statistic to the bit
    asg_a = store.read_table(store.dictionary_dir(key) / "assignments.lance", columns=["region_id", "distance"])
    asg_b = fresh_store.read_table(fresh_store.dictionary_dir(key) / "assignments.lance",
                                   columns=["region_id", "distance"])
    assert asg_a.equals(asg_b)
    sat_a = ask(StoreDB(store), key, "saturation").to_pydict()
    assert sat_a == ask(StoreDB(fresh_store), key, "saturation").to_pydict()
    assert max(sat_a["tokens"]) == a["tokens"]  # the partial last batch never counts more tokens than exist


def test_resume_point_of_metas_written_before_issue_18():
    meta = {"build": {"batch_size": 10, "saturation_window": 1}, "builder": {"tokens": 25, "new_in_open_batch": 0},
            "saturation_curve": [3, 1, 0, 0]}  # end of stream: partial batch closed, then a rerun appended a 0
    assert resume_point(meta) == ([3, 1], 0, 0, None)  # old code: saturated, never resumed
    meta["saturation_curve"] = [3, 1, 2]
    assert resume_point(meta) == ([3, 1], 2, 0, None)
    budget = {"build": {"batch_size": 10, "saturation_window": 2}, "builder": {"tokens": 25, "new_in_open_batch": 4},
              "saturation_curve": [3, 0]}
    assert resume_point(budget) == ([3, 0], 4, 1, None)
    done = {"build": {"batch_size": 10, "saturation_window": 2}, "builder": {"tokens": 40, "new_in_open_batch": 0},
            "saturation_curve": [3, 1, 0, 0]}
    assert resume_point(done) == ([3, 1, 0, 0], 0, 2, "saturated")


def test_as_of_meta_keeps_each_builds_curve(store):
    build(cfg(max_tokens=1000), store, progress=False)  # stops inside batch 3 (1000 = 3 * 256 + 232)
    at_1000 = meta_of(store, KEY)["saturation_curve"]
    build(cfg(), store, progress=False)
    assert Dictionary.load(store, KEY, as_of="tokens-1000").meta["saturation_curve"] == at_1000
    assert len(at_1000) == 4
    history = meta_of(store, KEY)["history"]
    assert [h["activations"]["key"] for h in history] == [str(KEY.activations)] * 2
    assert json.loads(json.dumps(history))[0]["open_batch"] == at_1000[-1]
    assert np.all(np.array(meta_of(store, KEY)["saturation_curve"][:3]) == np.array(at_1000[:3]))


def test_build_cli_after_a_resumed_harvest_equals_a_fresh_build(models_dir, tmp_path):
    """The issue's commands: ep build, the same ep build again, ep harvest --max-tokens larger
    (resumes and appends), the same ep build: equal to one fresh build of the longer stream."""
    from ep_store.stages.harvest import HarvestConfig, harvest

    store = Store(tmp_path / "store")
    hcfg = dict(model="tiny", checkpoint="base", layers=(2,), ctx=64, batch_size=8, device="cpu")
    harvest(HarvestConfig(**hcfg, max_tokens=1000), store, models_dir, progress=False)
    args = ["build", "--model", "tiny", "--checkpoint", "base", "--layer", "2", "--percentile", "5",
            "--calibration-tokens", "500", "--calibration-batch", "250", "--batch-size", "256",
            "--saturation-window", "1", "--device", "cpu", "--no-progress", "--store", str(store.root)]
    assert cli(*args).exit_code == 0
    folder = store.dictionary_dir(KEY)
    before = digests([folder], None)
    assert cli(*args).exit_code == 0
    assert digests([folder], None) == before and store.versions(folder / "exemplars.lance") == [1]
    harvest(HarvestConfig(**hcfg, max_tokens=2000), store, models_dir, progress=False)
    assert cli(*args).exit_code == 0
    fresh = Store(tmp_path / "fresh")
    shutil.copytree(store.root / "activations", fresh.root / "activations")
    assert cli(*args[:-1], str(fresh.root)).exit_code == 0
    a, b = meta_of(store, KEY), meta_of(fresh, KEY)
    assert a["tokens"] > 1000 and a["tokens"] == b["tokens"]
    for field in ("regions", "saturation_curve", "stop_reason"):
        assert a[field] == b[field], field
    assert store.read_table(folder / "exemplars.lance").equals(fresh.read_table(fresh.dictionary_dir(KEY) /
                                                                                "exemplars.lance"))
    assert sorted(a["tags"]) == sorted([*b["tags"], f"tokens-{a['history'][0]['tokens']}"])  # and the first build's
