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
with no token missing or repeated. A resume first proves it continues the same stream
(issue 8, A4): the tokenizer and weights fingerprints stored with the dataset must match,
and the stored rows' (doc_id, pos, token_id, token, char span) must equal the new stream's
prefix; otherwise it stops with exit 2 and says to pass --overwrite. One harvest per key
at a time (writer locks, exit 2 naming the other process), and each dataset is compacted
into few fragments at the end (a compaction version: same rows, same order).

    ep harvest --model gemma-3-270m --checkpoint base --layers 6,12 --corpus builtin \
        --max-tokens 20000 --ctx 128 --batch-size 16 --store data/store
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import KW_ONLY, asdict, dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from ep_store import jsonio
from ep_store.environment import ENVIRONMENT_KEY, environment
from ep_store.errors import UsageError, options_changed
from ep_store.keys import ActivationKey
from ep_store.stages import models
from ep_store.stages.corpus import Context, iter_contexts, iter_documents, special_prefix
from ep_store.stages.hostcopy import HostBlock, to_host
from ep_store.stages.writer import BackgroundWriter
from ep_store.store import META_KEY, Store, commit_fragments, vectors_to_arrow
from ep_store.store.fragments import compact
from ep_store.store.streams import FINGERPRINT_KEY as CORPUS_FINGERPRINT
from ep_store.store.streams import corpus_fingerprint

log = logging.getLogger(__name__)


@dataclass
class HarvestConfig:
    model: str
    """Model name: a folder under the models dir, or a hub id."""
    checkpoint: str
    """Checkpoint name (the local sub-folder, or the hub revision)."""
    layers: tuple[int, ...]
    """0-based decoder blocks whose outputs are stored."""
    _: KW_ONLY  # the rest by keyword only: positional options landed in the wrong field (issue 18, D10)
    corpus: str = "builtin"
    """Corpus spec: builtin, chat and/or .txt/.jsonl/.csv/.parquet paths, comma-separated
    (ep_store.stages.corpus; files read by ep_store.stages.readers)."""
    text_field: str = "text"
    """Field holding the text in .jsonl/.csv/.parquet corpus files (issue 18, B5)."""
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
    writer_depth: int = 2
    """Batches queued for the background Lance writer while the next forward pass runs
    (issue 12); 0 writes each batch before the next forward pass. Either way the same rows."""

    def __post_init__(self):
        self.layers = tuple(sorted(set(int(x) for x in self.layers)))
        if not self.layers or min(self.layers) < 0:
            raise UsageError("--layers needs one or more non-negative block numbers, e.g. 6,12")
        for name in ("max_tokens", "ctx", "batch_size"):
            if getattr(self, name) <= 0:
                raise UsageError(f"--{name.replace('_', '-')} must be positive")
        if not 0 <= self.writer_depth <= MAX_WRITER_DEPTH:
            raise UsageError(f"--writer-depth must lie in 0..{MAX_WRITER_DEPTH} (0: synchronous writes; each queued "
                             "batch holds its activations in memory)")
        if self.dtype not in models.DTYPES:
            raise UsageError(f"unknown dtype {self.dtype!r}; use one of {', '.join(models.DTYPES)}")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise UsageError(f"unknown storage dtype {self.storage_dtype!r}; use one of {', '.join(STORAGE_DTYPES)}")
        if self.bos not in BOS_POLICIES:
            raise UsageError(f"unknown BOS policy {self.bos!r}; use one of {', '.join(BOS_POLICIES)}")

    @property
    def keys(self) -> dict[int, ActivationKey]:
        """The activation dataset key of each layer."""
        return {L: ActivationKey(self.model, self.checkpoint, L) for L in self.layers}

    def stream_meta(self, layer: int, prefix_ids: list[int]) -> dict:
        """What a dataset was harvested with; resuming needs the same stream."""
        return {"model": self.model, "checkpoint": self.checkpoint, "layer": layer,
                "corpus": self.corpus, "ctx": self.ctx, "dtype": self.dtype,
                "storage_dtype": self.storage_dtype, "bos": self.bos, "prefix_ids": list(prefix_ids),
                # only when not the default, so datasets harvested before the option still resume
                **({"text_field": self.text_field} if self.text_field != "text" else {})}

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
MAX_WRITER_DEPTH = 64  # batches queued for the background writer: the bound that keeps memory flat
TORCH_STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
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
        path = store.activation_path(cfg.keys[layer])
        held[layer] = 0
        if store.exists(path) and not cfg.overwrite:
            info = store.info(path)
            # What defines the stream must match; the fingerprint is checked once the model is
            # loaded, and the machine may differ (issue 18, E14.1).
            stored = {k: v for k, v in info.meta.items() if k not in ("fingerprint", ENVIRONMENT_KEY)}
            if stored != cfg.stream_meta(layer, prefix_ids):
                raise options_changed(str(path), stored, cfg.stream_meta(layer, prefix_ids),
                                      {"prefix_ids": "prefix ids (from --bos)"})
            held[layer] = info.rows
    return held


@dataclass
class HarvestPlan:
    """Everything decided before the first forward pass: the stream, the keys and what each
    layer already holds. The local loop and the Ray engine (ep_store.stages.engines) run the same
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
    fingerprint: dict | None = None
    """Tokenizer and weights identity (stream_fingerprint), set once the model is loaded."""
    corpus_id: dict | None = None
    """The corpus's whole document list (streams.corpus_fingerprint), recorded in ``fingerprint``
    so that joins can tell which datasets hold the same documents (issue 18, A3)."""

    @property
    def keys(self) -> dict[int, ActivationKey]:
        return self.cfg.keys

    def meta(self, layer: int) -> dict:
        """The dataset metadata rows of ``layer`` are written with (needs the fingerprint), and
        the environment of the write that created the dataset (Lance keeps the first schema
        metadata on append; issue 18, E14.1)."""
        return {**self.cfg.stream_meta(layer, self.prefix_ids), "fingerprint": self.fingerprint,
                ENVIRONMENT_KEY: environment(models.resolve_device(self.cfg.device), self.cfg.dtype)}

    def accept_fingerprint(self, fingerprint: dict) -> None:
        """Record the loaded model's fingerprint; UsageError when resuming rows of another
        tokenizer or model (issue 8, A4)."""
        fingerprint = {**fingerprint, **(self.corpus_id or {})}
        if not self.cfg.overwrite:
            check_fingerprints(self.cfg, self.store, self.held, fingerprint)
        self.fingerprint = fingerprint

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
    documents = list(iter_documents(cfg.corpus, cfg.text_field))  # read it all first: a bad file fails before any write
    if not documents:
        raise UsageError(f"corpus {cfg.corpus!r} holds no text; pass builtin or a non-empty file")
    config = models.load_config(cfg.model, cfg.checkpoint, models_dir)
    tokenizer = models.load_tokenizer(cfg.model, cfg.checkpoint, models_dir)
    prefix_ids = cfg.prefix_ids(tokenizer)
    check_chat_documents(documents, tokenizer, cfg.corpus)
    held = prepare_keys(cfg, store, config, prefix_ids)
    models.resolve_device(cfg.device)
    corpus_id = corpus_fingerprint(documents)  # the whole list, whatever the token budget (issue 18, A3)
    planned = HarvestPlan(cfg, store, documents, tokenizer, prefix_ids, held, config, corpus_id=corpus_id)
    if not cfg.overwrite:  # resume proof, before any weights load: tokenizer, corpus, then text (issue 8, A4)
        check_fingerprints(cfg, store, held, {"tokenizer": tokenizer_fingerprint(tokenizer), **corpus_id})
        check_same_text(planned)
    return planned


def check_chat_documents(documents: list, tokenizer, spec: str) -> None:
    """UsageError for ``chat:FILE`` documents this tokenizer cannot read as chat: no Gemma turn
    tokens in its vocabulary (the markers would be stored as characters), or a document that
    starts with the BOS string (the harvester prepends BOS itself; a rendered template's
    ``<bos>`` would be stored as characters on top of it)."""
    from ep_store.stages.prompts import CONTROL

    files = [s.strip() for s in spec.split(",") if s.strip().startswith("chat:")]
    if not files:
        return
    missing = [m for m in CONTROL if m not in tokenizer.get_added_vocab()]
    if missing:
        raise UsageError(f"{files[0]} is Gemma chat format but this tokenizer has no {' / '.join(missing)} token; "
                         f"harvest the file without chat: (markers as text)")
    bos = tokenizer.bos_token
    for doc in documents:
        if doc.chat and bos and doc.text.startswith(bos):
            raise UsageError(f"{doc.name} starts with {bos!r}: chat: documents hold the text after the BOS, "
                             "which the harvester adds itself (--bos); remove it from the file")


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
        self.net, self.tokenizer = models.load(cfg.model, cfg.checkpoint, models_dir, cfg.device, cfg.dtype)
        self.device = next(self.net.parameters()).device
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.capture = LayerCapture(models.decoder_layers(self.net), cfg.layers)
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


def harvest(cfg: HarvestConfig, store: Store, models_dir: Path, progress: bool = True) -> dict:
    """Harvest ``cfg`` into ``store`` in this process; returns the run summary.

    One Lance commit per layer per batch; a rerun resumes after the rows already held.
    Holds the writer lock of every key it writes (UsageError, exit 2, naming the process
    that holds one), and compacts each dataset at the end (issue 8, A2 and A3). Raises
    UsageError for bad input (before anything is written).
    """
    with writer_locks(cfg, store):
        try:
            summary = _harvest_locked(cfg, store, models_dir, progress)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: compact what was committed (issue 18, C8)
            compact_written(cfg, store)
            raise
        summary["compaction"] = compact_written(cfg, store)
    return summary


def compact_written(cfg: HarvestConfig, store: Store) -> dict:
    """Compact every dataset of ``cfg`` that exists (a compaction version: same rows, same
    order); the caller holds their writer locks."""
    return {str(k): compact(store, store.activation_path(k)) for k in cfg.keys.values()
            if store.exists(store.activation_path(k))}


@contextlib.contextmanager
def writer_locks(cfg: HarvestConfig, store: Store):
    """Hold the writer lock of every activation dataset ``cfg`` writes (both engines; issue 8, A3).
    Raises UsageError naming the process that holds one."""
    with contextlib.ExitStack() as locks:
        for key in cfg.keys.values():
            locks.enter_context(store.lock(store.activation_path(key), f"activations {key}"))
        yield


def _harvest_locked(cfg: HarvestConfig, store: Store, models_dir: Path, progress: bool) -> dict:
    plan_ = plan(cfg, store, models_dir)
    runner = BatchRunner(cfg, models_dir, plan_.prefix_ids)
    plan_.accept_fingerprint(runner.fingerprint())
    keys = plan_.keys
    if cfg.overwrite:
        for key in keys.values():
            store.remove(store.activation_path(key))
    bytes_before = sum(_dir_bytes(store.activation_path(k)) for k in keys.values())
    start = time.perf_counter()
    bar = tqdm(total=cfg.max_tokens, unit="tok", desc=f"harvest {cfg.model}/{cfg.checkpoint}", disable=not progress)
    try:
        with BackgroundWriter(cfg.writer_depth) as writer:
            loop = _forward_and_write(plan_, runner, writer, bar)
    finally:
        bar.close()
        runner.close()
    if loop.total == 0:
        raise UsageError(f"corpus {cfg.corpus!r} produced no tokens")
    seconds = time.perf_counter() - start
    bytes_written = sum(_dir_bytes(store.activation_path(k)) for k in keys.values()) - bytes_before
    return {
        **plan_.summary(loop.new_tokens, seconds),
        "tokens_total": loop.total,
        **_timings(loop, writer, seconds),
        "bytes_written": bytes_written,
        "config": asdict(cfg),
    }


@dataclass
class _Loop:
    """What the forward loop did: stream rows seen, rows stored, and where the time went."""

    total: int = 0
    new_tokens: int = 0
    forward_s: float = 0.0
    """Main thread: forward passes, checks, conversion to the storage dtype, copy issue."""
    copy_s: float = 0.0
    """Writer thread: waiting for device-to-host copies to land, building Arrow tables."""


def _forward_and_write(plan_: HarvestPlan, runner: BatchRunner, writer: BackgroundWriter, bar) -> _Loop:
    """Every batch with rows still to store: forward pass here, Lance commits on ``writer``."""
    loop, held = _Loop(), dict(plan_.held)
    for stream_row, batch in plan_.batches():
        n = sum(len(c.token_ids) for c in batch)
        todo = [L for L in plan_.cfg.layers if held[L] < stream_row + n]
        if todo:
            t0 = time.perf_counter()
            columns, blocks = runner.host_blocks(batch, todo, stream_row)
            loop.forward_s += time.perf_counter() - t0
            skips = {L: max(0, held[L] - stream_row) for L in todo}  # rows of this batch already stored
            writer.submit(_write_batch, plan_, columns, blocks, skips, loop)
            held.update({L: stream_row + n for L in todo})
            loop.new_tokens += n - min(skips.values())  # rows of this batch not yet stored by some layer
        bar.update(n)
        loop.total = stream_row + n
    return loop


def _write_batch(plan_: HarvestPlan, columns: dict, blocks: dict[int, HostBlock], skips: dict[int, int],
                 loop: _Loop) -> None:
    """One Lance commit per layer of one batch (runs on the writer thread)."""
    for layer, skip in skips.items():
        t0 = time.perf_counter()
        rows = rows_table(columns, blocks[layer]).slice(skip)
        loop.copy_s += time.perf_counter() - t0
        plan_.store.append_activations(plan_.keys[layer], rows, plan_.meta(layer))


def _timings(loop: _Loop, writer: BackgroundWriter, seconds: float) -> dict:
    """Where a harvest's time went (issue 12): the model's forward passes, the copies, the
    Lance writes, and the time the model sat idle waiting for the writer."""
    write_s = max(writer.busy_s - loop.copy_s, 0.0)
    return {
        "forward_seconds": round(loop.forward_s, 3),
        "copy_seconds": round(loop.copy_s, 3),
        "write_seconds": round(write_s, 3),
        "model_idle_seconds": round(writer.wait_s, 3),
        "model_idle_share": round(writer.wait_s / seconds, 4) if seconds else 0.0,
        "write_share": round(write_s / seconds, 4) if seconds else 0.0,
        "writer_depth": writer.depth,
    }


# -- resume proof (issue 8, A4) -------------------------------------------------------------------
STREAM_INT_COLUMNS = ("doc_id", "pos", "token_id", "char_start", "char_end")


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


class StreamDigest:
    """sha256 of rows' (doc_id, pos, token_id, char_start, char_end, token), however they are batched."""

    def __init__(self):
        self.ints, self.text, self.rows = hashlib.sha256(), hashlib.sha256(), 0

    def update(self, columns, stop: int | None = None) -> None:
        """Add the first ``stop`` rows (all by default) of a table, record batch or dict of arrays."""
        table = pa.table(columns) if isinstance(columns, dict) else columns
        stop = table.num_rows if stop is None else stop
        table = table.slice(0, stop)
        ints = np.column_stack([table.column(c).to_numpy().astype(np.int64) for c in STREAM_INT_COLUMNS])
        self.ints.update(ints.tobytes())
        self.text.update("".join(f"{t}\0" for t in table.column("token").to_pylist()).encode("utf-8", "surrogatepass"))
        self.rows += stop

    def copy(self) -> StreamDigest:
        other = StreamDigest()
        other.ints, other.text, other.rows = self.ints.copy(), self.text.copy(), self.rows
        return other

    def hexdigest(self) -> str:
        return hashlib.sha256(self.ints.digest() + self.text.digest()).hexdigest()


def stored_digest(store: Store, key: ActivationKey, rows: int) -> StreamDigest:
    digest = StreamDigest()
    for batch in store.scan(store.activation_path(key), columns=[*STREAM_INT_COLUMNS, "token"], batch_size=65536,
                            limit=rows):
        digest.update(batch)
    return digest


def check_fingerprints(cfg: HarvestConfig, store: Store, held: dict[int, int], fingerprint: dict) -> None:
    """Refuse (UsageError) to resume rows harvested with another tokenizer or model; checks
    the parts ``fingerprint`` holds (the tokenizer alone before the weights are loaded)."""
    for layer, rows in held.items():
        if not rows:
            continue
        key = ActivationKey(cfg.model, cfg.checkpoint, layer)
        stored = store.info(store.activation_path(key)).meta.get("fingerprint")
        if stored is None:
            raise UsageError(f"{key} was harvested before stream fingerprints were recorded, so a resume cannot "
                             "prove it continues the same stream; pass --overwrite to harvest it again")
        for part, what in (("tokenizer", "tokenizer"), ("model", "model weights")):
            if part in fingerprint and stored.get(part) != fingerprint[part]:
                raise UsageError(f"{key} holds {rows} rows harvested with another {what} than {cfg.model}/"
                                 f"{cfg.checkpoint} has now; pass --overwrite to harvest it again from scratch")
        # Datasets from before issue 18 have no corpus part: they resume as before (and joins refuse them).
        part = CORPUS_FINGERPRINT
        if part in fingerprint and stored.get(part) not in (None, fingerprint[part]):
            raise UsageError(f"{key} holds {rows} rows of corpus {cfg.corpus!r} whose document list or text changed since "
                             "(its fingerprint over every document differs); pass --overwrite to harvest it again "
                             "from scratch")


def check_same_text(planned: HarvestPlan) -> None:
    """Refuse (UsageError) to resume a dataset whose stored rows are not the prefix of the
    stream the corpus gives now (its text, or how it tokenizes, changed)."""
    cfg, store = planned.cfg, planned.store
    targets: dict[int, list[int]] = {}
    for layer, rows in planned.held.items():
        if rows:
            targets.setdefault(min(rows, cfg.max_tokens), []).append(layer)
    if not targets:
        return
    expected = {n: stored_digest(store, ActivationKey(cfg.model, cfg.checkpoint, layers[0]), n).hexdigest()
                for n, layers in targets.items()}
    digest = StreamDigest()
    for row, batch in planned.batches():
        if row >= max(targets):
            break
        columns = pa.table(metadata_columns(batch))
        for n in sorted(t for t in targets if row < t <= row + columns.num_rows):
            prefix = digest.copy()
            prefix.update(columns, n - row)
            if prefix.hexdigest() != expected.pop(n):
                _refuse_other_text(cfg, targets[n], n)
        digest.update(columns)
    if expected:  # the stream ended before the rows already stored
        _refuse_other_text(cfg, targets[min(expected)], min(expected))


def _refuse_other_text(cfg: HarvestConfig, layers: list[int], rows: int):
    key = ActivationKey(cfg.model, cfg.checkpoint, layers[0])
    raise UsageError(f"{key} holds {rows} rows of another token stream than corpus {cfg.corpus!r} gives now "
                     "(its text changed); pass --overwrite to harvest it again from scratch")
