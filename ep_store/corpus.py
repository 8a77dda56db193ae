"""The token stream: documents from a corpus, cut into contexts of ``ctx`` tokens.

Corpus sources (comma-separated in a spec such as ``builtin,notes.jsonl``):
- ``builtin``: real English prose that every Python install carries, read at run time:
  the interpreter's help topics (``pydoc_data.topics``), then standard-library module
  docstrings read with ``ast`` (nothing is imported).
- ``chat``: the project's held-out chat prompts with their target responses, in Gemma's
  chat format (ep_store.prompts); put it first (``chat,builtin``) so a token budget keeps it.
- ``*.txt`` (one document per file), ``*.jsonl`` and ``*.parquet`` (a ``text`` field).

Document ids are ordinals in that deterministic order, so two harvests of one spec (with
any tokenizer) share doc ids and character offsets. Contexts never cross documents; BOS is
prepended by the harvester and never stored.
"""

from __future__ import annotations

import ast
import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ep_store.errors import UsageError

MIN_DOCSTRING_CHARS = 400  # shorter module docstrings are mostly one-line summaries


@dataclass(frozen=True)
class Document:
    doc_id: int
    name: str
    text: str


@dataclass(frozen=True)
class Context:
    """A window of one document's tokens; ``pos`` counts tokens from the document start."""

    doc_id: int
    start_pos: int
    token_ids: list[int]
    offsets: list[tuple[int, int]]


def builtin_texts() -> Iterator[tuple[str, str]]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield f"topic:{name}", topics[name]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")):
        try:
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        if doc and len(doc) >= MIN_DOCSTRING_CHARS:
            yield f"module:{path.stem}", doc


def chat_texts() -> Iterator[tuple[str, str]]:
    from ep_store.prompts import chat_stream_texts

    yield from chat_stream_texts()


def file_texts(path: Path, text_field: str = "text") -> Iterator[tuple[str, str]]:
    if not path.is_file():
        raise UsageError(f"corpus file {path} does not exist; pass builtin, chat or a .txt/.jsonl/.parquet file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            yield path.name, path.read_text(encoding="utf-8")
        elif suffix == ".jsonl":
            with path.open(encoding="utf-8") as lines:
                for i, line in enumerate(lines):
                    if line.strip():
                        yield f"{path.name}:{i}", json.loads(line)[text_field]
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            for i, text in enumerate(pq.read_table(path, columns=[text_field]).column(0).to_pylist()):
                yield f"{path.name}:{i}", text
        else:
            raise UsageError(f"corpus file {path} is not .txt, .jsonl or .parquet")
    except (KeyError, json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise UsageError(f"cannot read corpus file {path}: {type(err).__name__}: {err}") from None


def iter_documents(spec: str, text_field: str = "text") -> Iterator[Document]:
    """Documents of a corpus spec, in a deterministic order with ordinal ids."""
    doc_id = 0
    for source in (s.strip() for s in spec.split(",")):
        if source == "builtin":
            texts = builtin_texts()
        elif source == "chat":
            texts = chat_texts()
        elif source:
            texts = file_texts(Path(source), text_field)
        else:
            raise UsageError(f"empty source in corpus spec {spec!r}")
        for name, text in texts:
            if isinstance(text, str) and text.strip():
                yield Document(doc_id, name, text)
                doc_id += 1


def iter_contexts(documents, tokenizer, ctx: int) -> Iterator[Context]:
    """Cut each document's tokens into consecutive contexts of at most ``ctx`` tokens."""
    for doc in documents:
        enc = tokenizer(doc.text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        for start in range(0, len(ids), ctx):
            yield Context(doc.doc_id, start, ids[start : start + ctx], [tuple(o) for o in offsets[start : start + ctx]])


def document_texts(spec: str) -> dict[int, str]:
    """doc_id -> text for a spec (used to print contexts around tokens)."""
    return {doc.doc_id: doc.text for doc in iter_documents(spec)}
