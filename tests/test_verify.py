"""A reproduction told from a different computation (issue 18, E14): every stage records its
environment, digests ignore it, and ``ep store verify`` judges outputs identical, equivalent
(another machine's last bits) or different."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

from ep_store.analysis.verify import VerifyConfig, compare_json, counts, verify
from ep_store.cli.main import main
from ep_store.environment import environment
from ep_store.kernels.screen import choose_precision
from ep_store.keys import ActivationKey, DictionaryKey
from ep_store.stages.build import BuildConfig, build
from ep_store.stages.harvest import HarvestConfig, harvest
from ep_store.store import META_KEY, Store, arrow_to_vectors, vectors_to_arrow
from ep_store.store.digest import digest

KEY = DictionaryKey("tiny", "base", 1, 10.0)


def build_tiny(root, overwrite: bool = False) -> dict:
    cfg = BuildConfig("tiny", "base", 1, 10.0, calibration_tokens=500, calibration_batch=100, batch_size=128,
                      saturation_window=50, device="cpu", overwrite=overwrite)
    return build(cfg, Store(root), progress=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_store):
    """tiny_store's layer 1 with a p=10 dictionary and its assignments."""
    root = tmp_path_factory.mktemp("verify") / "store"
    shutil.copytree(tiny_store, root)
    build_tiny(root)
    return root


def perturb_vectors(root, seed: int = 0) -> None:
    """Every activation times (1 + 2**-20 * random sign): another CPU's kernels' last bits."""
    store = Store(root)
    path = store.activation_path(ActivationKey("tiny", "base", 1))
    table = store.read_table(path)
    x_ND = arrow_to_vectors(table.column("vector"))
    sign = np.random.default_rng(seed).choice([-1.0, 1.0], size=x_ND.shape)
    y_ND = (x_ND * (1 + 2.0 ** -20 * sign)).astype(np.float32)
    assert (y_ND != x_ND).mean() > 0.5
    column = table.schema.get_field_index("vector")
    table = table.set_column(column, table.schema.field(column), vectors_to_arrow(y_ND, np.float32))
    store.write_table(path, table.replace_schema_metadata(store.dataset(path).schema.metadata))


def verdicts(a, b, **options) -> dict[str, str]:
    return {row.path: row.verdict for row in verify(VerifyConfig(a, b, **options))}


def test_identical_copy_is_identical(reference, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    found = verdicts(copy, reference)
    assert set(found.values()) == {"identical"}
    assert {"activations/tiny/base/L1.lance", "dictionaries/tiny/base/L1/p10",
            "dictionaries/tiny/base/L1/p10/assignments.lance"} <= set(found)
    result = CliRunner().invoke(main, ["store", "verify", str(copy), str(reference)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stderr.strip().splitlines()[-1])["different"] == 0
    assert all(line.split("\t")[1] == "identical" for line in result.stdout.splitlines())


def test_last_bits_of_another_machine_are_equivalent(reference, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    perturb_vectors(copy)
    build_tiny(copy, overwrite=True)  # rebuild (and reassign) from the perturbed vectors
    found = verdicts(copy, reference)
    assert found["activations/tiny/base/L1.lance"] == "equivalent"
    assert found["dictionaries/tiny/base/L1/p10"] in ("equivalent", "identical")
    assert found["dictionaries/tiny/base/L1/p10/assignments.lance"] in ("equivalent", "identical")
    assert found["activations/tiny/base/L2.lance"] == "identical"
    assert "different" not in found.values()
    # digests alone cannot tell: the activations' digest changed
    assert digest(copy / "activations/tiny/base/L1.lance") != digest(reference / "activations/tiny/base/L1.lance")
    # a tolerance tighter than the perturbation: the same vectors are now different
    assert verdicts(copy, reference, rtol=1e-9)["activations/tiny/base/L1.lance"] == "different"


def test_another_corpus_is_different(reference, tmp_path, models_dir):
    text = tmp_path / "other.txt"
    text.write_text("Bees collect nectar from flowers and make honey in the hive. " * 60)
    other = tmp_path / "other"
    harvest(HarvestConfig("tiny", "base", (1,), corpus=str(text), max_tokens=3000, ctx=64, batch_size=8,
                          device="cpu"), Store(other), models_dir, progress=False)
    build_tiny(other)
    found = verdicts(other, reference)
    assert found["activations/tiny/base/L1.lance"] == "different"
    assert found["activations/tiny/base/L2.lance"] == "different"  # only in the reference
    assert found["dictionaries/tiny/base/L1/p10/assignments.lance"] == "different"
    result = CliRunner().invoke(main, ["store", "verify", str(other), str(reference), "--format", "jsonl"])
    assert result.exit_code == 1, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert {r["path"]: r["verdict"] for r in rows} == found
    summary = json.loads(result.stderr.strip().splitlines()[-1])
    assert summary["different"] == counts(verify(VerifyConfig(other, reference)))["different"] >= 3


def test_stages_record_the_environment_and_digests_ignore_it(reference, tmp_path):
    store = Store(reference)
    folder = store.dictionary_dir(KEY)
    meta = json.loads((folder / "meta.json").read_text())
    here = environment()
    for recorded in (meta["environment"], meta["history"][-1]["environment"],
                     store.info(store.activation_path(ActivationKey("tiny", "base", 1))).meta["environment"],
                     store.info(folder / "assignments.lance").meta["environment"]):
        assert {k: recorded[k] for k in ("torch", "numpy", "pylance", "duckdb", "cpu_capability")} == \
            {k: here[k] for k in ("torch", "numpy", "pylance", "duckdb", "cpu_capability")}
        assert recorded["device"] == "cpu"
    # The build's screening precision: --precision auto, resolved by the hardware (issue 20).
    assert meta["environment"]["dtype"] == choose_precision("auto", "cpu")
    # Another machine: other versions and CPU in the JSON, the same digest and an identical verdict.
    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    moved = meta | {"environment": meta["environment"] | {"cpu_capability": "AVX2", "torch": "9.9"}}
    (copy / folder.relative_to(reference) / "meta.json").write_text(json.dumps(moved))
    assert digest(copy / folder.relative_to(reference) / "meta.json") == digest(folder / "meta.json")
    assert verdicts(copy, reference)[folder.relative_to(reference).as_posix()] == "identical"


def test_json_numbers_within_rtol(tmp_path):
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    a.write_text(json.dumps({"regions": 6072, "theta": 0.21, "seconds": 3.0, "curve": [1, 2.0]}))
    b.write_text(json.dumps({"regions": 6072, "theta": 0.21 * (1 + 1e-6), "seconds": 9.0, "curve": [1, 2.0]}))
    c.write_text(json.dumps({"regions": 6130, "theta": 0.21, "seconds": 3.0, "curve": [1, 2.0]}))
    assert compare_json(a, b, 1e-3)[0] and not compare_json(a, b, 1e-9)[0]
    ok, detail = compare_json(a, c, 1e-3)
    assert not ok and "regions" in detail
    assert verdicts(a, b) == {".": "equivalent"} and verdicts(a, c) == {".": "different"}


def test_bad_input_is_one_line_exit_2(tmp_path):
    for args in ([str(tmp_path / "nothing"), str(tmp_path)], [str(tmp_path), str(tmp_path), "--rtol", "-1"],
                 [str(tmp_path), str(tmp_path), "--preserved", "0"]):
        result = CliRunner().invoke(main, ["store", "verify", *args])
        assert result.exit_code == 2, result.output
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_schema_metadata_is_not_a_difference(tmp_path):
    """Two datasets whose only difference is the recorded environment are identical."""
    store = Store(tmp_path / "s")
    table = pa.table({"doc_id": [0, 1], "vector": vectors_to_arrow(np.ones((2, 4), np.float32))})
    for name, env in (("a", {"torch": "1"}), ("b", {"torch": "2"})):
        store.write_table(tmp_path / "s" / name / "x.lance",
                          table.replace_schema_metadata({META_KEY: json.dumps({"environment": env}).encode()}))
    assert verdicts(tmp_path / "s" / "a", tmp_path / "s" / "b") == {"x.lance": "identical"}
