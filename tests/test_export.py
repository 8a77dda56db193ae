"""``ep export saelens``: the dictionary as a stock SAELens TopK SAE (issue 21, item 1)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ep_store.cli.main import main
from ep_store.keys import ActivationKey
from ep_store.stages.build import BuildConfig, build
from ep_store.stages.dictionary import Dictionary
from ep_store.stages.vectors import stream_vectors
from ep_store.store import Store
from tests.conftest import tree_snapshot

pytest.importorskip("sae_lens")
KEY = "tiny/base/L2/p5"


@pytest.fixture(scope="module")
def built(tiny_store, tmp_path_factory):
    """A dictionary on the first 2,000 tokens; the rest are held out."""
    root = tmp_path_factory.mktemp("export") / "store"
    shutil.copytree(tiny_store, root)
    store = Store(root)
    build(BuildConfig("tiny", "base", 2, 5.0, calibration_tokens=1000, calibration_batch=250, batch_size=256,
                      saturation_window=50, max_tokens=2000, device="cpu"), store, progress=False)
    return store


def export(store, out, *extra):
    return CliRunner().invoke(main, ["export", "saelens", KEY, "--out", str(out), "--store", str(store.root), *extra])


@pytest.mark.parametrize("decoder", ["exemplar", "mean"])
def test_saelens_encode_is_ep_assign(built, tmp_path, decoder):
    from sae_lens import SAE, TopKSAE

    done = export(built, tmp_path / "sae", "--decoder", decoder)
    assert done.exit_code == 0, done.output
    summary = json.loads(done.stderr.strip().splitlines()[-1])
    sae = SAE.load_from_disk(str(tmp_path / "sae"))
    d = Dictionary.load(built, KEY)
    assert isinstance(sae, TopKSAE) and sae.cfg.k == 1 and sae.cfg.d_sae == len(d) == summary["d_sae"]
    assert sae.cfg.metadata.hook_name == "blocks.2.hook_resid_post" and sae.cfg.apply_b_dec_to_input
    assert (tmp_path / "sae" / "sparsity.safetensors").is_file()
    x = torch.cat([b for b, _ in stream_vectors(built, built.activation_path(ActivationKey("tiny", "base", 2)), 999)])
    held = x[2000:]  # tokens the dictionary never saw
    with torch.no_grad():
        acts = sae.encode(held)
        pre = (held - d.center) @ d.exemplars.T
    region, _ = d.assign(held)
    top2 = pre.topk(2, dim=1).values
    positive = top2[:, 0] > 0
    clear = (top2[:, 0] - top2[:, 1]) > 1e-4 * top2[:, 0].abs()  # float32 top-1 vs ep assign's float64 at ties
    assert positive.sum() > 100 and (positive & ~clear).sum() <= 2
    rows = positive & clear
    assert ((acts[rows] != 0).sum(dim=1) == 1).all()
    assert torch.equal(acts[rows].argmax(dim=1), region[rows])
    assert (acts[~positive] == 0).all()  # best projection <= 0: SAELens's ReLU gives an all-zero row
    recon = sae.decode(acts[rows])
    W = d.exemplars if decoder == "exemplar" else torch.nn.functional.normalize(d.mean_directions, dim=1)
    expected = d.center + acts[rows].max(dim=1).values[:, None] * W[region[rows]]
    torch.testing.assert_close(recon, expected, rtol=1e-5, atol=1e-5)


def test_export_refuses_without_losing_anything(built, tmp_path):
    out = tmp_path / "sae"
    assert export(built, out).exit_code == 0
    before = tree_snapshot(out)
    for args, needle in ((["--decoder", "median"], "median"), ([], "exists")):
        done = export(built, out, *args)
        assert done.exit_code == 2 and needle in done.stderr and "Traceback" not in done.stderr
    assert tree_snapshot(out) == before
    done = CliRunner().invoke(main, ["export", "saelens", "tiny/base/L2/p7", "--out", str(tmp_path / "x"),
                                     "--store", str(built.root)])
    assert done.exit_code == 2 and not (tmp_path / "x").exists()
    assert export(built, out, "--overwrite").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]  # no staging folder left behind
    np.testing.assert_array_equal(np.sort([p.name for p in out.iterdir()]),
                                  ["cfg.json", "sae_weights.safetensors", "sparsity.safetensors"])


def test_export_never_replaces_what_is_not_an_export(built, tmp_path, monkeypatch):
    """--out the store, a folder holding it, the working folder, a file, or a folder of other
    files: exit 2 even with --overwrite, and nothing is deleted (helper's findings)."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep")
    (tmp_path / "afile").write_text("x")
    monkeypatch.chdir(tmp_path)
    before = tree_snapshot(built.root)
    for out, needle in ((built.root, "store"), (built.root.parent, "store"), (tmp_path, "working folder"),
                        (".", "working folder"), ("", "working folder"), (tmp_path / "afile", "is a file"),
                        (tmp_path / "mine", "holds files an export does not write")):
        done = export(built, out, "--overwrite")
        assert done.exit_code == 2 and needle in done.stderr and "Traceback" not in done.stderr, (out, done.output)
    assert tree_snapshot(built.root) == before and (tmp_path / "mine" / "precious.txt").read_text() == "keep"
    assert (tmp_path / "afile").read_text() == "x"
