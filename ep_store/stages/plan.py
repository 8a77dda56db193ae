"""Plan a harvest: its config and everything decided before the first forward pass.

``plan`` reads the corpus, loads the tokenizer and the model's config, validates layers,
limits and existing datasets, and proves that a resume continues the same stream (issue 8,
A4): the tokenizer and weights fingerprints stored with a dataset must match, and the stored
rows' (doc_id, pos, token_id, token, char span) must equal the new stream's prefix. The local
loop (ep_store.stages.harvest) and the Ray engine (ep_store.stages.engines) run the same
``HarvestPlan``, so they store the same rows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import KW_ONLY, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from ep_store import jsonio
from ep_store.environment import ENVIRONMENT_KEY, environment
from ep_store.errors import UsageError, options_changed
from ep_store.keys import DEFAULT_HOOK, ActivationKey, check_hook
from ep_store.stages import models
from ep_store.stages.capture import STORAGE_DTYPES, batched, metadata_columns, tokenizer_fingerprint
from ep_store.stages.corpus import Context, encode, iter_contexts, iter_documents, special_prefix
from ep_store.stages.hub import TokenBudget
from ep_store.store import META_KEY, Store, commit_fragments
from ep_store.store.streams import FINGERPRINT_KEY as CORPUS_FINGERPRINT
from ep_store.store.streams import corpus_fingerprint

MAX_WRITER_DEPTH = 64  # batches queued for the background writer: the bound that keeps memory flat
BOS_POLICIES = ("auto", "always", "never")


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
    """Corpus spec: builtin, chat and/or .txt/.jsonl/.csv/.parquet/.arrow paths, comma-separated
    (ep_store.stages.corpus; files read by ep_store.stages.readers)."""
    text_field: str = "text"
    """Field holding the text in .jsonl/.csv/.parquet/.arrow corpus files (issue 18, B5)."""
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
    hook: str = DEFAULT_HOOK
    """Hook point read in each block (TransformerLens names: resid_post, resid_pre, resid_mid,
    attn_out, mlp_out; issue 21, item 4); part of the key unless it is resid_post."""
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
        check_hook(self.hook)
        if self.bos not in BOS_POLICIES:
            raise UsageError(f"unknown BOS policy {self.bos!r}; use one of {', '.join(BOS_POLICIES)}")

    @property
    def keys(self) -> dict[int, ActivationKey]:
        """The activation dataset key of each layer."""
        return {L: ActivationKey(self.model, self.checkpoint, L, self.hook) for L in self.layers}

    def stream_meta(self, layer: int, prefix_ids: list[int]) -> dict:
        """What a dataset was harvested with; resuming needs the same stream."""
        return {"model": self.model, "checkpoint": self.checkpoint, "layer": layer,
                "corpus": self.corpus, "ctx": self.ctx, "dtype": self.dtype,
                "storage_dtype": self.storage_dtype, "bos": self.bos, "prefix_ids": list(prefix_ids),
                # only when not the default, so datasets harvested before the option still resume
                **({"text_field": self.text_field} if self.text_field != "text" else {}),
                **({"hook": self.hook} if self.hook != DEFAULT_HOOK else {})}

    def prefix_ids(self, tokenizer) -> list[int]:
        """Ids put before every context (never stored): the BOS policy applied to this tokenizer."""
        if self.bos == "auto":
            return special_prefix(tokenizer)
        if self.bos == "never":
            return []
        if tokenizer.bos_token_id is None:
            raise UsageError(f"--bos always: the tokenizer of {self.model} has no BOS token; use auto or never")
        return [tokenizer.bos_token_id]


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
    # read it all first: a bad file fails before any write (an hf: stream up to the token budget)
    budget = None
    if "hf:" in cfg.corpus:
        tokenizer = models.load_tokenizer(cfg.model, cfg.checkpoint, models_dir)
        budget = TokenBudget(cfg.max_tokens, lambda text: len(encode(tokenizer, text)[0]))
    documents = list(iter_documents(cfg.corpus, cfg.text_field, budget))
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


# -- resume proof (issue 8, A4) -------------------------------------------------------------------
STREAM_INT_COLUMNS = ("doc_id", "pos", "token_id", "char_start", "char_end")


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
        key = cfg.keys[layer]
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
    expected = {n: stored_digest(store, cfg.keys[layers[0]], n).hexdigest()
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
    key = cfg.keys[layers[0]]
    raise UsageError(f"{key} holds {rows} rows of another token stream than corpus {cfg.corpus!r} gives now "
                     "(its text changed); pass --overwrite to harvest it again from scratch")
