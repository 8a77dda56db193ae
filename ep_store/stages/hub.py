"""Corpora streamed from Hugging Face ``datasets``: the ``hf:NAME[:CONFIG][:SPLIT]`` corpus source
(issue 21, item 5).

``datasets.load_dataset(NAME, CONFIG, split=SPLIT or "train", streaming=True)``: NAME is a hub id,
or a local folder of data files (what tests use: this machine has no hub); rows come in stream
order. A stream may be endless, so a harvest reads rows only until their tokens reach its token
budget (the rows are tokenized once to count them), and the corpus fingerprint covers exactly
the rows read: growing the budget later reads more rows, so harvest again with ``--overwrite``.
A row's field may hold text or a list of token ids (a pre-tokenized corpus).

    ep harvest --model gemma-3-270m --checkpoint base --layers 6 --corpus hf:roneneldan/TinyStories --max-tokens 200000
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ep_store.errors import UsageError, require
from ep_store.stages import readers


@dataclass(frozen=True)
class TokenBudget:
    """How far an ``hf:`` stream is read: until its rows hold ``tokens`` tokens, ``count(text)``
    being a text's token count (the harvest's tokenizer; ep_store.stages.corpus.encode)."""

    tokens: int
    count: Callable[[str], int]


def hub_texts(source: str, text_field: str, budget: TokenBudget | None) -> Iterator[tuple[str, str | tuple]]:
    """(name, text or ids) of the rows of a streamed ``hf:NAME[:CONFIG][:SPLIT]`` dataset, until
    their tokens reach ``budget`` (None: every row). UsageError for a dataset that cannot be
    opened or a row without ``text_field``; EnvError without ``datasets``."""
    parts = source[len("hf:"):].split(":")
    if not parts[0] or len(parts) > 3:
        raise UsageError(f"corpus source {source!r}: expected hf:NAME, hf:NAME:CONFIG or hf:NAME:CONFIG:SPLIT")
    name, config, split = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None), \
        (parts[2] if len(parts) > 2 and parts[2] else "train")
    datasets = require("datasets", "hf", "an hf: corpus")
    try:
        rows = iter(datasets.load_dataset(name, config, split=split, streaming=True))
        first = next(rows, None)
    except Exception as err:  # noqa: BLE001 - hub, network, format: any failure to open is one line
        raise UsageError(f"cannot stream {source!r}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                         " (no hub here? save the dataset to a folder and pass the folder)") from None
    used = 0
    for i, row in enumerate(itertools.chain([first] if first is not None else [], rows)):
        if budget is not None and used >= budget.tokens:
            return
        if text_field not in row:
            raise UsageError(readers.missing_field(f"corpus {source!r} row {i}", text_field, row))
        value = row[text_field]
        if isinstance(value, (list, tuple)):
            value = tuple(value)
        elif isinstance(value, str):
            readers.check_string(value, f"corpus {source!r} row {i}")
        elif value is not None:
            raise UsageError(f"corpus {source!r} row {i}: field {text_field!r} holds {type(value).__name__}, not text")
        if budget is not None and value is not None:
            used += len(value) if isinstance(value, tuple) else budget.count(value)
        yield f"{source}:{i}", value
