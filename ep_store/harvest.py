"""Harvest residual-stream activations into the store.

One forward pass per batch of contexts captures every requested layer with forward hooks
on the decoder blocks and stops right after the deepest one (a hook raises), so later
blocks, the final norm and the unembedding are never computed. ``vector`` is the output
of decoder block ``layer`` (0-based), the point TransformerLens calls
``blocks.<layer>.hook_resid_post``; BOS and padding are never stored.

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
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from ep_store import models
from ep_store.corpus import Context, iter_contexts, iter_documents
from ep_store.errors import UsageError
from ep_store.keys import ActivationKey
from ep_store.store import Store, vectors_to_arrow

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
    """Compute dtype of the model; vectors are stored as float16."""
    overwrite: bool = False
    """Delete existing datasets of these keys first instead of resuming."""

    def __post_init__(self):
        self.layers = tuple(sorted(set(int(x) for x in self.layers)))
        if not self.layers or min(self.layers) < 0:
            raise UsageError("--layers needs one or more non-negative block numbers, e.g. 6,12")
        for name in ("max_tokens", "ctx", "batch_size"):
            if getattr(self, name) <= 0:
                raise UsageError(f"--{name.replace('_', '-')} must be positive")
        if self.dtype not in models.DTYPES:
            raise UsageError(f"unknown dtype {self.dtype!r}; use one of {', '.join(models.DTYPES)}")

    def stream_meta(self, layer: int) -> dict:
        """What a dataset was harvested with; resuming needs the same stream."""
        return {"model": self.model, "checkpoint": self.checkpoint, "layer": layer,
                "corpus": self.corpus, "ctx": self.ctx, "dtype": self.dtype}


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
            c = Context(c.doc_id, c.start_pos, c.token_ids[:left], c.offsets[:left])
        left -= len(c.token_ids)
        yield c


def batched(items: Iterable, n: int) -> Iterator[list]:
    it = iter(items)
    while batch := list(islice(it, n)):
        yield batch


class TokenText:
    """Token id -> its text, decoded once per id."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token_id: int) -> str:
        if token_id not in self.cache:
            self.cache[token_id] = self.tokenizer.decode([token_id])
        return self.cache[token_id]


def batch_inputs(batch: list[Context], bos_id: int | None, pad_id: int):
    """Right-padded input ids with BOS first, and the mask; returns the first token column."""
    first = 1 if bos_id is not None else 0
    width = first + max(len(c.token_ids) for c in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, c in enumerate(batch):
        if first:
            ids[row, 0] = bos_id
        ids[row, first : first + len(c.token_ids)] = torch.tensor(c.token_ids)
        mask[row, : first + len(c.token_ids)] = 1
    return ids, mask, first


def metadata_columns(batch: list[Context], token_text: TokenText) -> dict[str, pa.Array]:
    doc_id, pos, token_id, token, start, end = [], [], [], [], [], []
    for c in batch:
        n = len(c.token_ids)
        doc_id += [c.doc_id] * n
        pos += range(c.start_pos, c.start_pos + n)
        token_id += c.token_ids
        token += [token_text(t) for t in c.token_ids]
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


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def prepare_keys(cfg: HarvestConfig, store: Store, n_blocks: int) -> dict[int, int]:
    """Validate layers and existing datasets; rows already held per layer (0 when new)."""
    bad = [L for L in cfg.layers if L >= n_blocks]
    if bad:
        raise UsageError(f"layer {bad[0]} is out of range: {cfg.model} has blocks 0..{n_blocks - 1}")
    held = {}
    for layer in cfg.layers:
        path = store.activation_path(ActivationKey(cfg.model, cfg.checkpoint, layer))
        held[layer] = 0
        if store.exists(path) and not cfg.overwrite:
            info = store.info(path)
            if {k: v for k, v in info.meta.items() if k != "fingerprint"} != cfg.stream_meta(layer):
                raise UsageError(
                    f"{path} was harvested with other options ({info.meta}); pass --overwrite to replace it"
                )
            held[layer] = info.rows
    return held


def harvest(cfg: HarvestConfig, store: Store, models_dir: Path, progress: bool = True) -> dict:
    """Harvest ``cfg`` into ``store``; returns the run summary.

    Holds the writer lock of every key it writes (UsageError, exit 2, naming the process
    that holds one), and compacts each dataset at the end (issue 8, A2 and A3).
    """
    keys = [ActivationKey(cfg.model, cfg.checkpoint, L) for L in cfg.layers]
    with contextlib.ExitStack() as locks:
        for key in keys:
            locks.enter_context(store.lock(store.activation_path(key), f"activations {key}"))
        summary = _harvest_locked(cfg, store, models_dir, progress)
        summary["compaction"] = {str(k): store.compact(store.activation_path(k)) for k in keys
                                 if store.exists(store.activation_path(k))}
    return summary


def _open(cfg: HarvestConfig, store: Store, models_dir: Path):
    """Checks, model and tokenizer, resume proof; (documents, held rows per layer, net, tokenizer, fingerprint)."""
    documents = list(iter_documents(cfg.corpus))  # read it all first: a bad file fails before any write
    if not documents:
        raise UsageError(f"corpus {cfg.corpus!r} holds no text; pass builtin or a non-empty file")
    config = models.load_config(cfg.model, cfg.checkpoint, models_dir)
    held = prepare_keys(cfg, store, config.num_hidden_layers)  # all checks before loading weights
    models.resolve_device(cfg.device)
    net, tokenizer = models.load(cfg.model, cfg.checkpoint, models_dir, cfg.device, cfg.dtype)
    fingerprint = stream_fingerprint(net, tokenizer)
    if cfg.overwrite:
        for layer in cfg.layers:
            store.remove(store.activation_path(ActivationKey(cfg.model, cfg.checkpoint, layer)))
    else:
        check_same_stream(cfg, store, held, fingerprint, documents, tokenizer)
    return documents, held, net, tokenizer, fingerprint


def _harvest_locked(cfg: HarvestConfig, store: Store, models_dir: Path, progress: bool) -> dict:
    documents, held, net, tokenizer, fingerprint = _open(cfg, store, models_dir)
    blocks = models.decoder_layers(net)
    keys = {L: ActivationKey(cfg.model, cfg.checkpoint, L) for L in cfg.layers}
    bytes_before = sum(_dir_bytes(store.activation_path(k)) for k in keys.values())

    device = next(net.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    bos_id = tokenizer.bos_token_id
    token_text = TokenText(tokenizer)
    capture = LayerCapture(blocks, cfg.layers)
    contexts = take_tokens(iter_contexts(documents, tokenizer, cfg.ctx), cfg.max_tokens)

    stream_row = new_tokens = 0
    overflow = dict.fromkeys(cfg.layers, 0)
    forward_s = write_s = 0.0
    start = time.perf_counter()
    bar = tqdm(total=cfg.max_tokens, unit="tok", desc=f"harvest {cfg.model}/{cfg.checkpoint}", disable=not progress)
    try:
        for batch in batched(contexts, cfg.batch_size):
            n = sum(len(c.token_ids) for c in batch)
            todo = [L for L in cfg.layers if held[L] < stream_row + n]
            if todo:
                t0 = time.perf_counter()
                ids, mask, first = batch_inputs(batch, bos_id, pad_id)
                with torch.inference_mode():
                    hidden = capture.run(net, ids.to(device), mask.to(device))
                keep = mask[:, first:].bool().reshape(-1)  # real tokens only, in row order
                vectors = {L: hidden[L][:, first:].reshape(-1, hidden[L].shape[-1])[keep.to(device)]
                           .to(torch.float16).cpu().numpy() for L in todo}
                # Some models (Gemma) have residual entries beyond float16's range; they are
                # stored as inf, counted here, and dropped by `ep build --skip-nonfinite`.
                for L in todo:
                    overflow[L] += int((~np.isfinite(vectors[L]).all(axis=1)).sum())
                columns = metadata_columns(batch, token_text)
                t1 = time.perf_counter()
                for L in todo:
                    skip = max(0, held[L] - stream_row)  # rows of this batch already stored
                    table = pa.table({**columns, "vector": vectors_to_arrow(vectors[L])}).slice(skip)
                    store.append_activations(keys[L], table, {**cfg.stream_meta(L), "fingerprint": fingerprint})
                    held[L] = stream_row + n
                write_s += time.perf_counter() - t1
                forward_s += t1 - t0
                new_tokens += n
            stream_row += n
            bar.update(n)
    finally:
        bar.close()
        capture.remove()
    if stream_row == 0:
        raise UsageError(f"corpus {cfg.corpus!r} produced no tokens")
    seconds = time.perf_counter() - start
    bytes_written = sum(_dir_bytes(store.activation_path(k)) for k in keys.values()) - bytes_before
    for layer, n in overflow.items():
        if n:
            log.warning("%s: %d vectors overflowed float16 and are stored as inf", keys[layer], n)
    return _summary(cfg, keys, new_tokens, stream_row, seconds, forward_s, write_s, bytes_written, overflow)


def _summary(cfg, keys, new_tokens, stream_row, seconds, forward_s, write_s, bytes_written, overflow) -> dict:
    return {
        "datasets": [str(k) for k in keys.values()],
        "tokens": new_tokens,
        "tokens_total": stream_row,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(new_tokens / seconds, 1) if new_tokens else 0.0,
        "forward_seconds": round(forward_s, 3),
        "write_seconds": round(write_s, 3),
        "write_share": round(write_s / seconds, 4) if seconds else 0.0,
        "bytes_written": bytes_written,
        "nonfinite_vectors": {str(keys[L]): n for L, n in overflow.items() if n},
        "config": asdict(cfg),
    }


# -- resume proof (issue 8, A4) -------------------------------------------------------------------
STREAM_INT_COLUMNS = ("doc_id", "pos", "token_id", "char_start", "char_end")


def stream_fingerprint(net: torch.nn.Module, tokenizer) -> dict:
    """Identity of what the stored rows depend on beside the harvest options.

    tokenizer: sha256 of its class, special tokens and, for fast tokenizers, its whole
    JSON (vocabulary, merges, normalizer, pre-tokenizer, post-processor, added tokens);
    else its sorted vocabulary. model: sha256 of the config and of every parameter's name,
    shape, dtype and a strided sample of up to 4,096 of its values. It is computed from the
    loaded weights, not from files: copying or re-saving a checkpoint (new mtimes, other
    shards) does not trip it, and it costs a few ms instead of a pass over every byte,
    while any fine-tune moves essentially every value of the tensors it trains, so a
    sample of each tensor catches it.
    """
    tok = hashlib.sha256(type(tokenizer).__name__.encode())
    tok.update(repr(sorted(tokenizer.special_tokens_map.items())).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    tok.update(backend.to_str().encode() if backend is not None else repr(sorted(tokenizer.get_vocab().items())).encode())
    model = hashlib.sha256(net.config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for name, param in net.named_parameters():
            flat = param.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)][:4096].float().cpu().numpy()
            model.update(f"{name}{tuple(param.shape)}{param.dtype}".encode())
            model.update(sample.tobytes())
    return {"tokenizer": tok.hexdigest(), "model": model.hexdigest()}


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


def check_same_stream(cfg: HarvestConfig, store: Store, held: dict[int, int], fingerprint: dict,
                      documents, tokenizer) -> None:
    """Refuse (UsageError) to resume a dataset whose rows came from another text, tokenizer or model."""
    targets: dict[int, list[int]] = {}
    for layer, rows in held.items():
        if not rows:
            continue
        key = ActivationKey(cfg.model, cfg.checkpoint, layer)
        stored = store.info(store.activation_path(key)).meta.get("fingerprint")
        if stored is None:
            raise UsageError(f"{key} was harvested before stream fingerprints were recorded, so a resume cannot "
                             "prove it continues the same stream; pass --overwrite to harvest it again")
        for part, what in (("tokenizer", "tokenizer"), ("model", "model weights")):
            if stored.get(part) != fingerprint[part]:
                raise UsageError(f"{key} holds {rows} rows harvested with another {what} than {cfg.model}/"
                                 f"{cfg.checkpoint} has now; pass --overwrite to harvest it again from scratch")
        targets.setdefault(min(rows, cfg.max_tokens), []).append(layer)
    if not targets:
        return
    expected = {n: stored_digest(store, ActivationKey(cfg.model, cfg.checkpoint, layers[0]), n).hexdigest()
                for n, layers in targets.items()}
    digest, token_text, row = StreamDigest(), TokenText(tokenizer), 0
    contexts = take_tokens(iter_contexts(documents, tokenizer, cfg.ctx), max(targets))
    for batch in batched(contexts, cfg.batch_size):
        columns = pa.table(metadata_columns(batch, token_text))
        for n in sorted(t for t in targets if row < t <= row + columns.num_rows):
            prefix = digest.copy()
            prefix.update(columns, n - row)
            if prefix.hexdigest() != expected.pop(n):
                _refuse_other_text(cfg, targets[n], n)
        digest.update(columns)
        row += columns.num_rows
    if expected:  # the stream ended before the rows already stored
        _refuse_other_text(cfg, targets[min(expected)], min(expected))


def _refuse_other_text(cfg: HarvestConfig, layers: list[int], rows: int):
    key = ActivationKey(cfg.model, cfg.checkpoint, layers[0])
    raise UsageError(f"{key} holds {rows} rows of another token stream than corpus {cfg.corpus!r} gives now "
                     "(its text changed); pass --overwrite to harvest it again from scratch")
