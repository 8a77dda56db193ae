"""Harvest: vectors equal the model's hidden states, resumes are exact, schema and offsets."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ep_store.keys import ActivationKey
from ep_store.stages import models
from ep_store.stages.capture import LayerCapture
from ep_store.stages.corpus import iter_documents
from ep_store.stages.harvest import HarvestConfig, harvest
from ep_store.store import Store, arrow_to_vectors


def read_all(store_root, key):
    store = Store(store_root)
    return store.read_table(store.activation_path(key))


def check_against_hidden_states(models_dir, model, checkpoint, store_root, layers, n_contexts=2, corpus="builtin"):
    """Stored rows equal what transformers gives on the same text with the tokenizer's defaults
    (``tok(text)``: its own BOS convention, issue 8 item 15), for the first context of documents."""
    folder = models_dir / model / checkpoint
    net = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    texts = {d.doc_id: d.text for d in iter_documents(corpus)}
    for layer in layers:
        store = Store(store_root)
        key = ActivationKey(model, checkpoint, layer)
        prefix = store.info(store.activation_path(key)).meta["prefix_ids"]
        table = read_all(store_root, key)
        doc = np.asarray(table.column("doc_id"))
        pos = np.asarray(table.column("pos"))
        ids = np.asarray(table.column("token_id"))
        stored = arrow_to_vectors(table.column("vector"))
        starts = np.flatnonzero(pos == 0)[:n_contexts]
        assert len(starts) == n_contexts
        for s in starts:
            e = s + 1
            while e < len(pos) and doc[e] == doc[s] and pos[e] == pos[e - 1] + 1 and pos[e] % 64 and e - s < 64:
                e += 1
            inp = tok(texts[int(doc[s])], return_tensors="pt")["input_ids"][:, : len(prefix) + e - s]
            assert inp[0, : len(prefix)].tolist() == prefix
            np.testing.assert_array_equal(inp[0, len(prefix):].numpy(), ids[s:e])
            with torch.no_grad():
                hidden = net(inp, output_hidden_states=True).hidden_states[layer + 1][0, len(prefix):]
            np.testing.assert_allclose(stored[s:e], hidden.numpy(), rtol=1e-4, atol=1e-4 * float(hidden.abs().max()))


def test_vectors_equal_hidden_states(models_dir, tiny_store):
    check_against_hidden_states(models_dir, "tiny", "base", tiny_store, [1, 2])


def test_schema_keys_and_offsets(tiny_store):
    store = Store(tiny_store)
    assert store.list_activations() == [ActivationKey("tiny", "base", 1), ActivationKey("tiny", "base", 2)]
    table = read_all(tiny_store, ActivationKey("tiny", "base", 1))
    schema = table.schema
    assert schema.field("vector").type == pa.list_(pa.float32(), 64)  # default storage dtype
    for name in ("doc_id", "pos", "token_id", "token", "char_start", "char_end"):
        assert name in schema.names
    assert table.num_rows == 3000
    texts = {d.doc_id: d.text for d in iter_documents("builtin")}
    rows = table.select(["doc_id", "token", "char_start", "char_end"]).to_pylist()
    mismatched = [r for r in rows if texts[r["doc_id"]][r["char_start"] : r["char_end"]] != r["token"]]
    # The tiny BPE marks no unknown pieces on this text, so every token slices back exactly.
    assert mismatched == []
    # Positions count up inside a document with no gap or repeat.
    doc = np.asarray(table.column("doc_id"))
    pos = np.asarray(table.column("pos"))
    same = doc[1:] == doc[:-1]
    assert (pos[1:][same] == pos[:-1][same] + 1).all()


class Interrupt(Exception):
    pass


def test_interrupted_harvest_resumes_exactly(models_dir, tmp_path, monkeypatch):
    cfg = HarvestConfig("tiny", "base", (1, 3), max_tokens=1500, ctx=64, batch_size=4, device="cpu")
    whole = tmp_path / "whole"
    harvest(cfg, Store(whole), models_dir, progress=False)

    # Kill the run after an odd number of commits: layer 1 holds one batch more than layer 3.
    real_append = Store.append_activations
    commits = {"n": 0}

    def append_then_die(self, key, table, meta):
        if commits["n"] == 5:
            raise Interrupt("killed between commits")
        commits["n"] += 1
        return real_append(self, key, table, meta)

    resumed = tmp_path / "resumed"
    monkeypatch.setattr(Store, "append_activations", append_then_die)
    with pytest.raises(Interrupt):
        harvest(cfg, Store(resumed), models_dir, progress=False)
    monkeypatch.setattr(Store, "append_activations", real_append)
    held = {L: Store(resumed).info(Store(resumed).activation_path(ActivationKey("tiny", "base", L))).rows for L in (1, 3)}
    assert held[1] > held[3] > 0
    summary = harvest(cfg, Store(resumed), models_dir, progress=False)
    assert summary["tokens_total"] == 1500
    for layer in (1, 3):
        a = read_all(whole, ActivationKey("tiny", "base", layer))
        b = read_all(resumed, ActivationKey("tiny", "base", layer))
        assert a.num_rows == b.num_rows == 1500
        assert a.drop(["vector"]).equals(b.drop(["vector"]))
        np.testing.assert_array_equal(arrow_to_vectors(a.column("vector")), arrow_to_vectors(b.column("vector")))
    # A third run has nothing left to do.
    assert harvest(cfg, Store(resumed), models_dir, progress=False)["tokens"] == 0


def test_forward_stops_after_deepest_layer(models_dir):
    net = AutoModelForCausalLM.from_pretrained(models_dir / "tiny" / "base").eval()
    blocks = models.decoder_layers(net)
    ran = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, b in enumerate(blocks)]
    head_calls = []
    handles.append(net.lm_head.register_forward_hook(lambda *a: head_calls.append(1)))
    capture = LayerCapture(blocks, [0, 1])
    out = capture.run(net, torch.tensor([[1, 5, 6, 7]]), torch.ones(1, 4, dtype=torch.long))
    capture.remove()
    for h in handles:
        h.remove()
    assert sorted(out) == [0, 1]
    assert ran == [0, 1] and head_calls == []


@pytest.mark.real_model
def test_real_gemma_vectors_equal_hidden_states(gemma_models_dir, tmp_path):
    cfg = HarvestConfig("gemma-3-270m", "base", (6,), max_tokens=300, ctx=128, batch_size=2, device="cpu")
    harvest(cfg, Store(tmp_path / "store"), gemma_models_dir, progress=False)
    check_against_hidden_states(gemma_models_dir, "gemma-3-270m", "base", tmp_path / "store", [6], n_contexts=1)
