"""The token stream: documents from a corpus, cut into contexts of ``ctx`` tokens.

Corpus sources (comma-separated in a spec such as ``builtin,notes.jsonl``):
- ``builtin``: real English prose that every Python install carries, read at run time:
  the interpreter's help topics (``pydoc_data.topics``), then standard-library module
  docstrings read with ``ast`` (nothing is imported).
- ``chat``: the project's held-out chat prompts with their target responses, in Gemma's
  chat format (ep_store.prompts); put it first (``chat,builtin``) so a token budget keeps it.
- ``*.txt`` (one document per file), ``*.jsonl`` and ``*.parquet`` (a ``text`` field).
- ``chat:FILE``: a file of that kind whose texts are in Gemma's chat format, turn markers
  included (the refusal study harvests its chat-formatted prompts this way).

Document ids are ordinals in that deterministic order, so two harvests of one spec (with
any tokenizer) share doc ids and character offsets. Contexts never cross documents; BOS is
prepended by the harvester and never stored.

Tokens are the text (issue 8, D):
- Text is text: a literal ``<bos>`` or ``<|im_start|>`` inside a document is encoded as
  ordinary characters (``split_special_tokens=True``). Only the ``chat`` sources carry chat
  formatting, and only its turn markers that the tokenizer knows as added tokens
  (``prompts.CONTROL``) become control ids; everything between them is text.
- Each token's text is the exact slice of the document it covers, and a document's tokens
  tile it: token i covers ``[char_start_i, char_end_i)`` with ``char_start_i = char_end_{i-1}``
  (whitespace a tokenizer leaves out goes to the following token; byte-level pieces of one
  character: the first piece holds the character, the rest are empty). So emoji, CJK and
  rare glyphs survive, and concatenating a context's tokens gives its text back.
- BOS follows the tokenizer's own convention (``special_prefix``): what
  ``tokenizer(text)`` puts before the text by default (Gemma: ``<bos>``; SmolLM2: nothing).
"""

from __future__ import annotations

import ast
import json
import re
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
    chat: bool = False  # the text carries chat formatting (the ``chat`` source): its turn markers are control tokens


@dataclass(frozen=True)
class Context:
    """A window of one document's tokens; ``pos`` counts tokens from the document start."""

    doc_id: int
    start_pos: int
    token_ids: list[int]
    offsets: list[tuple[int, int]]  # (char_start, char_end) of each token; they tile the document
    tokens: list[str]  # text[char_start:char_end] of each token

    def head(self, n: int) -> Context:
        """The first ``n`` tokens."""
        return Context(self.doc_id, self.start_pos, self.token_ids[:n], self.offsets[:n], self.tokens[:n])


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
    if path.is_dir():
        raise UsageError(f"corpus file {path} is a folder; pass a .txt/.jsonl/.parquet file")
    if not path.is_file():
        raise UsageError(f"corpus file {path} does not exist; pass builtin, chat, a .txt/.jsonl/.parquet file "
                         "or chat:FILE")
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            yield path.name, path.read_text(encoding="utf-8")
        elif suffix == ".jsonl":
            with path.open(encoding="utf-8") as lines:
                for i, line in enumerate(lines):
                    if line.strip():
                        text = json.loads(line)[text_field]
                        if isinstance(text, str):
                            text.encode("utf-8")  # a lone surrogate (\ud83d) is no text: UnicodeEncodeError
                        yield f"{path.name}:{i}", text
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            for i, text in enumerate(pq.read_table(path, columns=[text_field]).column(0).to_pylist()):
                yield f"{path.name}:{i}", text
        else:
            raise UsageError(f"corpus file {path} is not .txt, .jsonl or .parquet")
    except (KeyError, json.JSONDecodeError, UnicodeError, OSError) as err:
        raise UsageError(f"cannot read corpus file {path}: {type(err).__name__}: {err}") from None


def iter_documents(spec: str, text_field: str = "text") -> Iterator[Document]:
    """Documents of a corpus spec, in a deterministic order with ordinal ids."""
    doc_id = 0
    for source in (s.strip() for s in spec.split(",")):
        if source == "builtin":
            texts = builtin_texts()
        elif source == "chat":
            texts = chat_texts()
        elif source.startswith("chat:"):
            path = source[len("chat:"):].strip()
            if not path:
                raise UsageError(f"chat: needs a file in corpus spec {spec!r}, e.g. chat:prompts.jsonl")
            texts = file_texts(Path(path).expanduser(), text_field)
        elif source:
            texts = file_texts(Path(source), text_field)
        else:
            raise UsageError(f"empty source in corpus spec {spec!r}")
        for name, text in texts:
            if isinstance(text, str) and text.strip():
                yield Document(doc_id, name, text, chat=source == "chat" or source.startswith("chat:"))
                doc_id += 1


def encode_turn(tokenizer, before: str, content: str, after: str) -> list[int]:
    """Ids of one chat-template rendering ``before + content + after`` (issue 9; QA).

    Strings of the tokenizer's added tokens (BOS, turn markers) inside the template parts
    ``before`` and ``after`` are control ids; everything else is text, encoded as in the
    corpus, and the content whole: a ``<start_of_turn>`` a user typed stays characters, as
    it does in a harvest. Text runs between control ids are encoded in one piece, template
    text and content together (``user\n`` + prompt), as ``encode(chat=True)`` does.
    """
    added = tokenizer.get_added_vocab()
    pattern = re.compile("|".join(map(re.escape, sorted(added, key=len, reverse=True)))) if added else None
    segments: list[str | int] = []
    for part in (before, None, after):
        if part is None:
            segments.append(content)
            continue
        at = 0
        for m in pattern.finditer(part) if pattern else ():
            segments += [part[at : m.start()], added[m.group()]]
            at = m.end()
        segments.append(part[at:])
    ids: list[int] = []
    text = ""
    for seg in [*segments, -1]:
        if isinstance(seg, str):
            text += seg
            continue
        if text:
            ids += _encode_plain(tokenizer, text, split=True)[0]
            text = ""
        if seg >= 0:
            ids.append(seg)
    return ids


def _encode_plain(tokenizer, text: str, split: bool) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=split)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def encode(tokenizer, text: str, chat: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
    """(token ids, raw character offsets) of ``text``, no special tokens added.

    Special-token strings in the text are ordinary text; with ``chat=True`` the chat turn
    markers (``prompts.CONTROL``) that this tokenizer has as added tokens stay control ids.
    Every site that encodes text goes through here (harvest, finetune).
    """
    if not chat:
        return _encode_plain(tokenizer, text, split=True)
    from ep_store.prompts import CONTROL

    added = tokenizer.get_added_vocab()
    controls = [m for m in CONTROL if m in added]
    if not controls:
        return _encode_plain(tokenizer, text, split=True)
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    at = 0
    for piece in re.split("(" + "|".join(map(re.escape, controls)) + ")", text):
        if piece:
            piece_ids, piece_offsets = (([added[piece]], [(0, len(piece))]) if piece in controls
                                        else _encode_plain(tokenizer, piece, split=True))
            ids += piece_ids
            offsets += [(a + at, b + at) for a, b in piece_offsets]
        at += len(piece)
    return ids, offsets


def tiling_spans(offsets: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Raw tokenizer offsets -> spans that tile the text: each starts where the last ended.

    Gaps (whitespace a pre-tokenizer drops) join the following token; byte-level pieces that
    share one character give it to the first piece and leave the others empty.
    """
    spans, end = [], None
    for a, b in offsets:
        start = a if end is None else end
        end = max(b, start)
        spans.append((start, end))
    return spans


def special_prefix(tokenizer) -> list[int]:
    """Ids the tokenizer puts before a text by default (its BOS convention), e.g. [2] for Gemma."""
    probe = "Hello world"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    for cut in range(len(full) - len(plain) + 1):
        if full[cut : cut + len(plain)] == plain:
            return list(full[:cut])
    return []


def iter_contexts(documents, tokenizer, ctx: int) -> Iterator[Context]:
    """Cut each document's tokens into consecutive contexts of at most ``ctx`` tokens."""
    for doc in documents:
        ids, raw = encode(tokenizer, doc.text, chat=doc.chat)
        spans = tiling_spans(raw)
        for start in range(0, len(ids), ctx):
            window = spans[start : start + ctx]
            yield Context(doc.doc_id, start, ids[start : start + ctx], window, [doc.text[a:b] for a, b in window])


def document_texts(spec: str) -> dict[int, str]:
    """doc_id -> text for a spec (used to print contexts around tokens)."""
    return {doc.doc_id: doc.text for doc in iter_documents(spec)}
