"""Model capture: the one module that runs a model forward and collects activations.

One forward pass per batch of contexts captures every requested layer with forward hooks
on the decoder blocks and stops right after the deepest one (a hook raises), so later
blocks, the final norm and the unembedding are never computed. ``vector`` is hook point
``hook`` of decoder block ``layer`` (0-based), by default its output, the point TransformerLens
calls ``blocks.<layer>.hook_resid_post`` (others: ep_store.stages.hookpoints; issue 21, item 4);
BOS and padding are never stored.

The harvest (both engines: ep_store.stages.harvest, ep_store.stages.engines), ``ep search``
(ep_store.analysis.search) and the evaluations (ep_store.evaluate.features) all capture
through here, so one batch gives the same vectors whoever runs it. Vectors are converted to
the storage dtype on the model's device and checked first (``check_storable``: non-finite
values and float16 overflow are refused before anything of the batch is written; issue 8).
The stream fingerprint (tokenizer and weights identity) is computed from the loaded model.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch

from ep_store.errors import UsageError
from ep_store.keys import DEFAULT_HOOK, ActivationKey
from ep_store.stages import hookpoints, models
from ep_store.stages.corpus import Context
from ep_store.stages.hostcopy import HostBlock, to_host
from ep_store.store import vectors_to_arrow

if TYPE_CHECKING:
    from ep_store.stages.plan import HarvestConfig

STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16}
"""Dtypes a harvest may store vectors as (Arrow has no bfloat16; issue 8)."""
TORCH_STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65,504


class _StopForward(Exception):
    """Raised by the hook on the deepest requested block to end the forward pass."""


class LayerCapture:
    """Hooks that keep hook point ``hook`` of some blocks and stop after the deepest
    (ep_store.stages.hookpoints says where each hook point lives)."""

    def __init__(self, blocks: torch.nn.ModuleList, layers: Iterable[int], hook: str = DEFAULT_HOOK):
        self.layers = sorted(layers)
        self.hook = hook
        self.outputs: dict[int, torch.Tensor] = {}
        self._handles = []
        try:
            for i in self.layers:
                self._handles.append(hookpoints.attach(blocks[i], hook, self._keeper(i)))
        except BaseException:
            self.remove()
            raise

    def _keeper(self, index: int):
        def keep(x_BTD: torch.Tensor):
            self.outputs[index] = x_BTD
            if index == self.layers[-1]:
                raise _StopForward

        return keep

    def run(self, net: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[int, torch.Tensor]:
        self.outputs = {}
        with contextlib.suppress(_StopForward):
            net(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return self.outputs

    def remove(self):
        for h in self._handles:
            h.remove()


def batched(items: Iterable, n: int) -> Iterator[list]:
    it = iter(items)
    while batch := list(islice(it, n)):
        yield batch


def batch_inputs(batch: list[Context], prefix_ids: list[int], pad_id: int):
    """Right-padded input ids with the prefix (BOS) first, and the mask; returns the first token column."""
    first = len(prefix_ids)
    width = first + max(len(c.token_ids) for c in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, c in enumerate(batch):
        ids[row, :first] = torch.tensor(prefix_ids, dtype=torch.long)
        ids[row, first : first + len(c.token_ids)] = torch.tensor(c.token_ids)
        mask[row, : first + len(c.token_ids)] = 1
    return ids, mask, first


def metadata_columns(batch: list[Context]) -> dict[str, pa.Array]:
    doc_id, pos, token_id, token, start, end = [], [], [], [], [], []
    for c in batch:
        n = len(c.token_ids)
        doc_id += [c.doc_id] * n
        pos += range(c.start_pos, c.start_pos + n)
        token_id += c.token_ids
        token += c.tokens  # the document slices (issue 8, item 16), not decoded ids
        start += [o[0] for o in c.offsets]
        end += [o[1] for o in c.offsets]
    return {
        "doc_id": pa.array(doc_id, pa.int64()),
        "pos": pa.array(pos, pa.int32()),
        "token_id": pa.array(token_id, pa.int32()),
        "token": pa.array(token, pa.string()),
        "char_start": pa.array(start, pa.int32()),
        "char_end": pa.array(end, pa.int32()),
    }


def check_storable(x_ND: torch.Tensor, cfg: HarvestConfig, key: ActivationKey, stream_row: int) -> None:
    """UsageError unless the hidden states of one batch can be stored as they are.

    Refuses (before anything of the batch is written) non-finite values from the model's
    compute, naming the real cause, and values beyond the storage dtype's range (issue 8, item 8).
    Runs on the tensor's own device.
    """
    finite = torch.isfinite(x_ND).all(dim=1)
    if not finite.all():
        bad = int((~finite).sum())
        cause = (f"the model's {cfg.dtype} compute produced them (its range or precision is too small for "
                 "this model); compute in float32 or bfloat16 (--dtype)" if cfg.dtype != "float32"
                 else "the model itself produced them in float32")
        raise UsageError(f"{key}: {bad} vectors from stream row {stream_row} on hold NaN/inf; {cause}; "
                         "nothing of this batch was written")
    if cfg.storage_dtype == "float16":
        peak = float(x_ND.abs().max())
        if peak > FLOAT16_MAX:
            raise UsageError(f"{key}: values up to {peak:.4g} from stream row {stream_row} on exceed float16's range "
                             f"(+-{FLOAT16_MAX:.0f}); harvest with --storage-dtype float32; "
                             "nothing of this batch was written")


class BatchRunner:
    """The model, loaded once, turning one batch of contexts into one table per layer.

    Both engines call this, so a batch gives the same rows whichever engine runs it."""

    def __init__(self, cfg: HarvestConfig, models_dir: Path, prefix_ids: list[int]):
        self.cfg, self.prefix_ids = cfg, prefix_ids
        self.net, self.tokenizer = models.load(cfg.model, cfg.checkpoint, models_dir, cfg.device, cfg.dtype)
        self.device = next(self.net.parameters()).device
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.capture = LayerCapture(models.decoder_layers(self.net), cfg.layers, cfg.hook)
        self.keys = cfg.keys

    def host_blocks(self, batch: list[Context], layers: list[int],
                    stream_row: int = 0) -> tuple[dict[str, pa.Array], dict[int, HostBlock]]:
        """Metadata columns of every real token of ``batch`` (no BOS, no padding) and, per
        layer, its (N, D) vectors converted to the storage dtype on the model's device and on
        their way to host memory (pinned, non-blocking on CUDA; issue 12).

        Every layer is checked (check_storable) before anything is returned: a refused
        batch writes nothing."""
        ids, mask, first = batch_inputs(batch, self.prefix_ids, self.pad_id)
        with torch.inference_mode():
            hidden = self.capture.run(self.net, ids.to(self.device), mask.to(self.device))
            keep = mask[:, first:].bool().reshape(-1).to(self.device)  # real tokens only, in row order
            vectors = {L: hidden[L][:, first:].reshape(-1, hidden[L].shape[-1])[keep] for L in layers}
            for L in layers:
                check_storable(vectors[L], self.cfg, self.keys[L], stream_row)
            dtype = TORCH_STORAGE_DTYPES[self.cfg.storage_dtype]
            return metadata_columns(batch), {L: to_host(vectors[L], dtype) for L in layers}

    def tables(self, batch: list[Context], layers: list[int], stream_row: int = 0) -> dict[int, pa.Table]:
        """One table per layer of ``layers``: the rows of every real token of ``batch``."""
        columns, blocks = self.host_blocks(batch, layers, stream_row)
        return {L: rows_table(columns, blocks[L]) for L in layers}

    def fingerprint(self) -> dict:
        return stream_fingerprint(self.net, self.tokenizer)

    def close(self) -> None:
        self.capture.remove()


def rows_table(columns: dict[str, pa.Array], block: HostBlock) -> pa.Table:
    """The activation rows of one batch and layer: metadata columns and the vectors (waits for
    the block's copy to land)."""
    vectors_ND = block.numpy()
    return pa.table({**columns, "vector": vectors_to_arrow(vectors_ND, vectors_ND.dtype)})


def stream_fingerprint(net: torch.nn.Module, tokenizer) -> dict:
    """Identity of what the stored rows depend on beside the harvest options.

    It is computed from the loaded tokenizer and weights, not from files: copying or
    re-saving a checkpoint (new mtimes, other shards) does not trip it, and it costs a few
    ms instead of a pass over every byte, while any fine-tune moves essentially every value
    of the tensors it trains, so a sample of each tensor catches it.
    """
    return {"tokenizer": tokenizer_fingerprint(tokenizer), "model": model_fingerprint(net)}


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's class, special tokens and, for fast tokenizers, its whole
    JSON (vocabulary, merges, normalizer, pre-tokenizer, post-processor, added tokens);
    else its sorted vocabulary."""
    tok = hashlib.sha256(type(tokenizer).__name__.encode())
    tok.update(repr(sorted(tokenizer.special_tokens_map.items())).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    tok.update(backend.to_str().encode() if backend is not None else repr(sorted(tokenizer.get_vocab().items())).encode())
    return tok.hexdigest()


def model_fingerprint(net: torch.nn.Module) -> str:
    """sha256 of the config and of every parameter's name, shape, dtype and a strided
    sample of up to 4,096 of its values."""
    model = hashlib.sha256(net.config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for name, param in net.named_parameters():
            flat = param.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)][:4096].float().cpu().numpy()
            model.update(f"{name}{tuple(param.shape)}{param.dtype}".encode())
            model.update(sample.tobytes())
    return model.hexdigest()
