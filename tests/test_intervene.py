"""Interventions (issue 9): the pure edits, the hooks on a tiny random-init model, removal."""

from __future__ import annotations

import shutil

import pytest
import torch

from ep_store.errors import UsageError
from ep_store.kernels.edits import ablate, orthonormal_basis, steer
from ep_store.stages import models
from ep_store.stages.build import BuildConfig, build
from ep_store.stages.dictionary import Dictionary
from ep_store.store.core import Store
from ep_store.studies.intervene import Edit, ablation, intervene, steering, steering_scale

LAYER = 1


@pytest.fixture(scope="module")
def store(tiny_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("intervene") / "store"
    shutil.copytree(tiny_store, root)
    build(BuildConfig("tiny", "base", LAYER, 10, calibration_batch=256, batch_size=256, device="cpu"),
          Store(root), assign=False, progress=False)
    return Store(root)


@pytest.fixture(scope="module")
def dictionary(store):
    return Dictionary.load(store, f"tiny/base/L{LAYER}/p10")


@pytest.fixture(scope="module")
def net(models_dir):
    return models.load("tiny", "base", models_dir, "cpu")[0]


@pytest.fixture(scope="module")
def ids(tiny_tokenizer):
    text = ["The quick brown fox jumps over the lazy dog.", "Lists and tuples are sequences of objects."]
    enc = tiny_tokenizer(text, return_tensors="pt", padding=True)
    return enc["input_ids"]


def block_output(net, ids, layer, edits=()):
    """Output of block ``layer`` as the rest of the model sees it (after any edit hooks)."""
    seen = {}
    with intervene(net, list(edits)):
        block = models.decoder_layers(net)[layer]
        handle = block.register_forward_hook(lambda m, a, out: seen.setdefault("x", out[0] if isinstance(out, tuple) else out))
        try:
            with torch.no_grad():
                logits = net(input_ids=ids).logits
        finally:
            handle.remove()
    return seen["x"], logits


# -- the pure edits -------------------------------------------------------------------------------
def test_ablate_removes_exactly_the_span():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=g, dtype=torch.float64)
    c = torch.randn(16, generator=g, dtype=torch.float64)
    Q = orthonormal_basis(torch.randn(3, 16, generator=g)).double()
    out = ablate(x, Q, c)
    torch.testing.assert_close(out @ Q, (c @ Q).expand(3, 5, -1))  # projection = center's projection
    P = torch.eye(16, dtype=torch.float64) - Q @ Q.T
    torch.testing.assert_close(out @ P, x @ P)  # the orthogonal part is unchanged
    # plain reference: subtract each orthonormal column's component one at a time
    ref = x.clone() - c
    for k in range(Q.shape[1]):
        ref = ref - (ref @ Q[:, k])[..., None] * Q[:, k]
    torch.testing.assert_close(out, ref + c)


def test_orthonormal_basis_drops_dependent_directions():
    v = torch.randn(2, 8)
    Q = orthonormal_basis(torch.stack([v[0], v[1], 2 * v[0] - v[1]]))
    assert Q.shape == (8, 2)
    torch.testing.assert_close(Q.T @ Q, torch.eye(2), atol=1e-6, rtol=0)


def test_steer_adds_alpha_scale_d():
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    d = torch.nn.functional.normalize(torch.randn(8, dtype=torch.float64), dim=0)
    torch.testing.assert_close(steer(x, d, 2.5, 3.0) - x, (7.5 * d).expand_as(x))


def test_edits_refuse_bad_arguments_with_value_error():
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="Q_DK has width 6"):
        ablate(x, torch.zeros(6, 1), torch.zeros(8))
    with pytest.raises(ValueError, match="c_D has width 6"):
        ablate(x, torch.zeros(8, 1), torch.zeros(6))
    with pytest.raises(ValueError, match="d_D has width 4"):
        steer(x, torch.ones(4), 1.0, 1.0)
    with pytest.raises(ValueError, match="2-D"):
        orthonormal_basis(torch.ones(8))


# -- hooks on a model -----------------------------------------------------------------------------
def test_hooked_block_output_has_the_component_removed(net, ids, dictionary):
    regions = [0, min(2, len(dictionary) - 1)]
    edit = ablation(dictionary, regions)
    plain, _ = block_output(net, ids, LAYER)
    hooked, _ = block_output(net, ids, LAYER, [edit])
    Q, c = edit.Q_DK, dictionary.center
    assert Q.shape[1] == len(set(regions))
    torch.testing.assert_close(hooked @ Q, (c @ Q).expand(*hooked.shape[:2], -1), atol=1e-4, rtol=0)
    P = torch.eye(Q.shape[0]) - Q @ Q.T
    torch.testing.assert_close(hooked @ P, plain @ P, atol=1e-4, rtol=0)
    assert not torch.allclose(hooked, plain)


def test_mean_basis_differs_from_exemplar(net, ids, dictionary):
    a, _ = block_output(net, ids, LAYER, [ablation(dictionary, [0], "exemplar")])
    b, _ = block_output(net, ids, LAYER, [ablation(dictionary, [0], "mean")])
    assert not torch.allclose(a, b)


def test_no_regions_is_bit_identical_and_hooks_come_off(net, ids, dictionary):
    block = models.decoder_layers(net)[LAYER]
    before = len(block._forward_hooks)
    _, plain = block_output(net, ids, LAYER)
    _, empty = block_output(net, ids, LAYER, [])
    _, none = block_output(net, ids, LAYER, [ablation(dictionary, [])])
    assert torch.equal(plain, empty) and torch.equal(plain, none)
    assert len(block._forward_hooks) == before
    with pytest.raises(RuntimeError, match="boom"), intervene(net, [ablation(dictionary, [0])]):
        assert len(block._forward_hooks) == before + 1
        raise RuntimeError("boom")
    assert len(block._forward_hooks) == before
    _, after = block_output(net, ids, LAYER)
    assert torch.equal(plain, after)


def test_steering_moves_block_output_exactly(net, ids, dictionary):
    edit = steering(dictionary, 1, alpha=1.5, scale=2.0)
    plain, _ = block_output(net, ids, LAYER)
    hooked, _ = block_output(net, ids, LAYER, [edit])
    d = dictionary.exemplars[1] / dictionary.exemplars[1].norm()
    torch.testing.assert_close(hooked - plain, (3.0 * d).expand_as(plain), atol=1e-5, rtol=0)


def test_edits_compose_over_layers(net, ids, dictionary, store):
    other = Dictionary.load(store, f"tiny/base/L{LAYER}/p10")
    shifted = steering(other, 0, alpha=1.0, scale=1.0)
    shifted.layer = LAYER + 1  # same width, another block: composition over layers
    one, _ = block_output(net, ids, LAYER + 1, [shifted])
    both, logits = block_output(net, ids, LAYER + 1, [ablation(dictionary, [0]), shifted])
    assert not torch.allclose(one, both)  # the earlier ablation changed what block L+1 saw
    for block in models.decoder_layers(net):
        assert not block._forward_hooks


def test_model_dtype_is_kept(models_dir, ids, dictionary):
    net16 = models.load("tiny", "base", models_dir, "cpu", "bfloat16")[0]
    hooked, logits = block_output(net16, ids, LAYER, [ablation(dictionary, [0]), steering(dictionary, 0, 1.0, 1.0)])
    assert hooked.dtype == torch.bfloat16 and torch.isfinite(logits).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(models_dir, ids, dictionary):
    cpu = models.load("tiny", "base", models_dir, "cpu")[0]
    gpu = models.load("tiny", "base", models_dir, "cuda")[0]
    edit = ablation(dictionary, [0, 1])
    a, _ = block_output(cpu, ids, LAYER, [edit])
    b, _ = block_output(gpu, ids.cuda(), LAYER, [edit])
    torch.testing.assert_close(b.cpu(), a, atol=1e-4, rtol=1e-4)


# -- bad input and the stored scale ----------------------------------------------------------------
def test_bad_input(net, dictionary):
    with pytest.raises(UsageError, match=rf"region {len(dictionary)} is out of range: .* regions 0\.\.{len(dictionary) - 1}"):
        ablation(dictionary, [0, len(dictionary)])
    with pytest.raises(UsageError, match="unknown basis"):
        ablation(dictionary, [0], "median")
    with pytest.raises(UsageError, match="finite number"):
        steering(dictionary, 0, float("nan"), 1.0)
    with pytest.raises(UsageError, match="width 32 differs"), intervene(net, [Edit(LAYER, "steer", 32, d_D=torch.ones(32))]):
        pass
    with pytest.raises(UsageError, match="layer 9 is out of range"), intervene(net, [Edit(9, "steer", 64, d_D=torch.ones(64))]):
        pass
    for block in models.decoder_layers(net):
        assert not block._forward_hooks


def test_scale_stored_at_build_and_fallback_agrees(store, dictionary):
    stored = dictionary.meta["scale"]
    assert stored > 0
    assert steering_scale(store, dictionary) == stored
    legacy = Dictionary(dictionary.key, {k: v for k, v in dictionary.meta.items() if k != "scale"}, dictionary.table)
    assert steering_scale(store, legacy) == pytest.approx(stored, rel=1e-6)
