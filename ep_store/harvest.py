"""Harvest residual-stream activations into the store.

One forward pass per batch of contexts captures every requested layer with forward hooks
on the decoder blocks and stops right after the deepest one (a hook raises), so later
blocks, the final norm and the unembedding are never computed. ``vector`` is the output
of decoder block ``layer`` (0-based), the point TransformerLens calls
``blocks.<layer>.hook_resid_post``; BOS and padding are never stored.

Numbers and tokens (issue 8):
- Vectors are stored as ``storage_dtype``: float32 by default, which holds every value a
  float32 model computes (Gemma 3 270M layer 12 exceeds float16's 65,504) at 4 bytes per
  value, i.e. 4 * d_model bytes per token (2,560 for Gemma 3 270M, 2,304 for SmolLM2-135M);
  float16 halves that and is refused, before the batch is written, for any batch with a
  value beyond its range. Non-finite values from the model's own compute (e.g.
  ``--dtype float16``) are refused with their cause. bfloat16 is not a storage choice:
  Arrow has no bfloat16 type (Lance's extension type is a binary column DuckDB reads as
  bytes) and it keeps 8 significant bits.
- Text is tokenized by ``corpus.encode`` (special-token strings are text); the token column
  is the document slice each token covers; BOS follows the tokenizer's convention
  (``--bos auto``) unless overridden, and is recorded in the dataset metadata.
- Limits are checked up front: ``ctx`` plus the BOS must fit the model's position table.

Each batch is appended as one Lance commit per layer. The stream of rows is deterministic
(corpus, tokenizer, ctx), so a rerun skips the rows each layer already holds and resumes
with no token missing or repeated.

    ep harvest --model gemma-3-270m --checkpoint base --layers 6,12 --corpus builtin \
        --max-tokens 20000 --ctx 128 --batch-size 16 --store data/store
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from ep_store import jsonio, models
from ep_store.corpus import Context, iter_contexts, iter_documents, special_prefix
from ep_store.errors import UsageError
from ep_store.keys import ActivationKey
from ep_store.store import META_KEY, Store, commit_fragments, vectors_to_arrow

log = logging.getLogger(__name__)


@dataclass
class HarvestConfig:
    model: str
    """Model name: a folder under the models dir, or a hub id."""
    checkpoint: str
    """Checkpoint name (the local sub-folder, or the hub revision)."""
    layers: tuple[int, ...]
    """0-based decoder blocks whose outputs are stored."""
    corpus: str = "builtin"
    """Corpus spec: builtin and/or .txt/.jsonl/.parquet paths, comma-separated."""
    max_tokens: int = 20_000
    """Stop after this many stored tokens (the stream prefix)."""
    ctx: int = 128
    """Tokens per context, BOS not counted."""
    batch_size: int = 16
    """Contexts per forward pass (and per Lance commit)."""
    device: str = "auto"
    """auto, cpu or cuda."""
    dtype: str = "float32"
    """Compute dtype of the model (float16 compute overflows in Gemma; such batches are refused)."""
    overwrite: bool = False
    """Delete existing datasets of these keys first instead of resuming."""
    storage_dtype: str = "float32"
    """Dtype of stored vectors: float32 (4 bytes per value, holds any float32 model's range) or
    float16 (2 bytes; a batch with a value beyond +-65,504 is refused before it is written)."""
    bos: str = "auto"
    """auto: the tokenizer's own convention (what tokenizer(text) prepends); always: prepend
    the tokenizer's BOS; never: no BOS. Recorded in the dataset metadata (issue 8, item 15)."""

    def __post_init__(self):
        self.layers = tuple(sorted(set(int(x) for x in self.layers)))
        if not self.layers or min(self.layers) < 0:
            raise UsageError("--layers needs one or more non-negative block numbers, e.g. 6,12")
        for name in ("max_tokens", "ctx", "batch_size"):
            if getattr(self, name) <= 0:
                raise UsageError(f"--{name.replace('_', '-')} must be positive")
        if self.dtype not in models.DTYPES:
            raise UsageError(f"unknown dtype {self.dtype!r}; use one of {', '.join(models.DTYPES)}")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise UsageError(f"unknown storage dtype {self.storage_dtype!r}; use one of {', '.join(STORAGE_DTYPES)}")
        if self.bos not in BOS_POLICIES:
            raise UsageError(f"unknown BOS policy {self.bos!r}; use one of {', '.join(BOS_POLICIES)}")

    def stream_meta(self, layer: int, prefix_ids: list[int]) -> dict:
        """What a dataset was harvested with; resuming needs the same stream."""
        return {"model": self.model, "checkpoint": self.checkpoint, "layer": layer,
                "corpus": self.corpus, "ctx": self.ctx, "dtype": self.dtype,
                "storage_dtype": self.storage_dtype, "bos": self.bos, "prefix_ids": list(prefix_ids)}

    def prefix_ids(self, tokenizer) -> list[int]:
        """Ids put before every context (never stored): the BOS policy applied to this tokenizer."""
        if self.bos == "auto":
            return special_prefix(tokenizer)
        if self.bos == "never":
            return []
        if tokenizer.bos_token_id is None:
            raise UsageError(f"--bos always: the tokenizer of {self.model} has no BOS token; use auto or never")
        return [tokenizer.bos_token_id]


STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16}
BOS_POLICIES = ("auto", "always", "never")


class _StopForward(Exception):
    """Raised by the hook on the deepest requested block to end the forward pass."""


class LayerCapture:
    """Forward hooks that keep the outputs of some blocks and stop after the deepest."""

    def __init__(self, blocks: torch.nn.ModuleList, layers: Iterable[int]):
        self.layers = sorted(layers)
        self.outputs: dict[int, torch.Tensor] = {}
        self._handles = [blocks[i].register_forward_hook(self._hook(i)) for i in self.layers]

    def _hook(self, index: int):
        def keep(module, args, output):
            self.outputs[index] = output[0] if isinstance(output, tuple) else output
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


def take_tokens(contexts: Iterable[Context], max_tokens: int) -> Iterator[Context]:
    """The stream prefix of ``max_tokens`` tokens (the last context may be cut short)."""
    left = max_tokens
    for c in contexts:
        if left <= 0:
            return
        if len(c.token_ids) > left:
            c = c.head(left)
        left -= len(c.token_ids)
        yield c


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


FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65,504


def storable(x_ND: torch.Tensor, cfg: HarvestConfig, key: ActivationKey, stream_row: int) -> np.ndarray:
    """Hidden states of one batch as a numpy array of the storage dtype, or UsageError.

    Refuses (before anything of the batch is written) non-finite values from the model's
    compute, naming the real cause, and values beyond the storage dtype's range (issue 8, item 8).
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
    return x_ND.to(torch.float32).cpu().numpy().astype(STORAGE_DTYPES[cfg.storage_dtype], copy=False)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def prepare_keys(cfg: HarvestConfig, store: Store, config, prefix_ids: list[int]) -> dict[int, int]:
    """Validate layers, model limits and existing datasets; rows already held per layer (0 when new)."""
    n_blocks = models.block_count(config)
    bad = [L for L in cfg.layers if L >= n_blocks]
    if bad:
        raise UsageError(f"layer {bad[0]} is out of range: {cfg.model} has blocks 0..{n_blocks - 1}")
    positions = models.max_positions(config)
    if positions is not None and cfg.ctx + len(prefix_ids) > positions:
        raise UsageError(f"--ctx {cfg.ctx} does not fit {cfg.model}: {positions} positions hold at most "
                         f"--ctx {positions - len(prefix_ids)} with {len(prefix_ids)} prefix (BOS) token(s)")
    held = {}
    for layer in cfg.layers:
        path = store.activation_path(ActivationKey(cfg.model, cfg.checkpoint, layer))
        held[layer] = 0
        if store.exists(path) and not cfg.overwrite:
            info = store.info(path)
            if info.meta != cfg.stream_meta(layer, prefix_ids):
                raise UsageError(
                    f"{path} was harvested with other options ({info.meta}); pass --overwrite to replace it"
                )
            held[layer] = info.rows
    return held


@dataclass
class HarvestPlan:
    """Everything decided before the first forward pass: the stream, the keys and what each
    layer already holds. The local loop and the Ray engine (ep_store.engines) run the same
    plan, so they store the same rows."""

    cfg: HarvestConfig
    store: Store
    documents: list
    tokenizer: object
    prefix_ids: list[int]
    held: dict[int, int]
    """Rows each layer's dataset already holds (0 when new or overwritten)."""
    config: object
    """The model's config (block count, width)."""

    @property
    def keys(self) -> dict[int, ActivationKey]:
        return {L: ActivationKey(self.cfg.model, self.cfg.checkpoint, L) for L in self.cfg.layers}

    def meta(self, layer: int) -> dict:
        return self.cfg.stream_meta(layer, self.prefix_ids)

    def batches(self) -> Iterator[tuple[int, list[Context]]]:
        """(first stream row, contexts) of every batch of the stream prefix, in order."""
        contexts = take_tokens(iter_contexts(self.documents, self.tokenizer, self.cfg.ctx), self.cfg.max_tokens)
        row = 0
        for batch in batched(contexts, self.cfg.batch_size):
            yield row, batch
            row += sum(len(c.token_ids) for c in batch)

    def todo(self) -> list[tuple[int, list[Context], dict[int, int | None]]]:
        """(first stream row, contexts, rows to skip per layer) of every batch with rows still
        to store; a layer whose rows are all held has skip None."""
        work = []
        for row, batch in self.batches():
            n = sum(len(c.token_ids) for c in batch)
            skip = {L: (max(0, self.held[L] - row) if self.held[L] < row + n else None) for L in self.cfg.layers}
            if any(v is not None for v in skip.values()):
                work.append((row, batch, skip))
        return work

    def commit(self, layer: int, fragments: list[dict]) -> int:
        """One Lance commit of a layer's fragments (Ray engine): append, or create/replace."""
        path = self.store.activation_path(self.keys[layer])
        exists = self.store.exists(path) and not self.cfg.overwrite
        schema = activation_schema(models.hidden_size(self.config), self.cfg.storage_dtype, self.meta(layer))
        read_version = self.store.info(path).version if self.store.exists(path) else None
        return commit_fragments(path, fragments, schema, read_version, append=exists)

    def summary(self, new_tokens: int, seconds: float) -> dict:
        return {
            "datasets": [str(k) for k in self.keys.values()],
            "tokens": new_tokens,
            "seconds": round(seconds, 3),
            "tokens_per_s": round(new_tokens / seconds, 1) if new_tokens and seconds else 0.0,
            "storage_dtype": self.cfg.storage_dtype,
            "vector_bytes_per_token": models.hidden_size(self.config)
            * np.dtype(STORAGE_DTYPES[self.cfg.storage_dtype]).itemsize,
            "prefix_ids": self.prefix_ids,
        }


def plan(cfg: HarvestConfig, store: Store, models_dir: Path) -> HarvestPlan:
    """Read the corpus and validate everything (layers, limits, existing datasets) before
    any weights are loaded or anything is written. Raises UsageError."""
    documents = list(iter_documents(cfg.corpus))  # read it all first: a bad file fails before any write
    if not documents:
        raise UsageError(f"corpus {cfg.corpus!r} holds no text; pass builtin or a non-empty file")
    config = models.load_config(cfg.model, cfg.checkpoint, models_dir)
    tokenizer = models.load_tokenizer(cfg.model, cfg.checkpoint, models_dir)
    prefix_ids = cfg.prefix_ids(tokenizer)
    held = prepare_keys(cfg, store, config, prefix_ids)
    models.resolve_device(cfg.device)
    return HarvestPlan(cfg, store, documents, tokenizer, prefix_ids, held, config)


def activation_schema(width: int, storage_dtype: str, meta: dict) -> pa.Schema:
    """Schema of an activation dataset, with the stream metadata that produced it."""
    vector = pa.list_(pa.from_numpy_dtype(STORAGE_DTYPES[storage_dtype]), width)
    return pa.schema([("doc_id", pa.int64()), ("pos", pa.int32()), ("token_id", pa.int32()), ("token", pa.string()),
                      ("char_start", pa.int32()), ("char_end", pa.int32()), ("vector", vector)],
                     metadata={META_KEY: jsonio.dumps(meta, sort_keys=True).encode()})


class BatchRunner:
    """The model, loaded once, turning one batch of contexts into one table per layer.

    Both engines call this, so a batch gives the same rows whichever engine runs it."""

    def __init__(self, cfg: HarvestConfig, models_dir: Path, prefix_ids: list[int]):
        self.cfg, self.prefix_ids = cfg, prefix_ids
        self.net, tokenizer = models.load(cfg.model, cfg.checkpoint, models_dir, cfg.device, cfg.dtype)
        self.device = next(self.net.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.capture = LayerCapture(models.decoder_layers(self.net), cfg.layers)
        self.keys = {L: ActivationKey(cfg.model, cfg.checkpoint, L) for L in cfg.layers}

    def tables(self, batch: list[Context], layers: list[int], stream_row: int = 0) -> dict[int, pa.Table]:
        """Rows of every real token of ``batch`` (no BOS, no padding) for each of ``layers``.

        Every layer is checked (storable) before any table is returned: a refused batch
        writes nothing."""
        ids, mask, first = batch_inputs(batch, self.prefix_ids, self.pad_id)
        with torch.inference_mode():
            hidden = self.capture.run(self.net, ids.to(self.device), mask.to(self.device))
        keep = mask[:, first:].bool().reshape(-1).to(self.device)  # real tokens only, in row order
        vectors = {L: storable(hidden[L][:, first:].reshape(-1, hidden[L].shape[-1])[keep],
                               self.cfg, self.keys[L], stream_row) for L in layers}
        columns = metadata_columns(batch)
        dtype = STORAGE_DTYPES[self.cfg.storage_dtype]
        return {L: pa.table({**columns, "vector": vectors_to_arrow(vectors[L], dtype)}) for L in layers}

    def close(self) -> None:
        self.capture.remove()


def harvest(cfg: HarvestConfig, store: Store, models_dir: Path, progress: bool = True) -> dict:
    """Harvest ``cfg`` into ``store`` in this process; returns the run summary.

    One Lance commit per layer per batch; a rerun resumes after the rows already held.
    Raises UsageError for bad input (before anything is written)."""
    plan_ = plan(cfg, store, models_dir)
    runner = BatchRunner(cfg, models_dir, plan_.prefix_ids)
    keys = plan_.keys
    if cfg.overwrite:
        for key in keys.values():
            store.remove(store.activation_path(key))
    bytes_before = sum(_dir_bytes(store.activation_path(k)) for k in keys.values())
    held = dict(plan_.held)
    total = new_tokens = 0
    forward_s = write_s = 0.0
    start = time.perf_counter()
    bar = tqdm(total=cfg.max_tokens, unit="tok", desc=f"harvest {cfg.model}/{cfg.checkpoint}", disable=not progress)
    try:
        for stream_row, batch in plan_.batches():
            n = sum(len(c.token_ids) for c in batch)
            todo = [L for L in cfg.layers if held[L] < stream_row + n]
            if todo:
                t0 = time.perf_counter()
                tables = runner.tables(batch, todo, stream_row)
                t1 = time.perf_counter()
                for L in todo:
                    skip = max(0, held[L] - stream_row)  # rows of this batch already stored
                    store.append_activations(keys[L], tables[L].slice(skip), plan_.meta(L))
                    held[L] = stream_row + n
                write_s += time.perf_counter() - t1
                forward_s += t1 - t0
                new_tokens += n
            bar.update(n)
            total = stream_row + n
    finally:
        bar.close()
        runner.close()
    if total == 0:
        raise UsageError(f"corpus {cfg.corpus!r} produced no tokens")
    seconds = time.perf_counter() - start
    bytes_written = sum(_dir_bytes(store.activation_path(k)) for k in keys.values()) - bytes_before
    return {
        **plan_.summary(new_tokens, seconds),
        "tokens_total": total,
        "forward_seconds": round(forward_s, 3),
        "write_seconds": round(write_s, 3),
        "write_share": round(write_s / seconds, 4) if seconds else 0.0,
        "bytes_written": bytes_written,
        "config": asdict(cfg),
    }
