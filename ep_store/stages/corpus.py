"""The token stream: documents from a corpus, cut into contexts of ``ctx`` tokens.

Corpus sources (comma-separated in a spec such as ``builtin,notes.jsonl``):
- ``builtin``: real English prose that every Python install carries, read at run time:
  the interpreter's help topics (``pydoc_data.topics``), then standard-library module
  docstrings read with ``ast`` (nothing is imported).
- ``stdlib``: the Python source (code and docstrings) of the standard-library packages the
  built-in evaluation tasks are about (``STDLIB_PACKAGES``), one file of each package in turn,
  so any prefix of the source holds every package (issue 22: a stream that covers the tasks).
- ``chat``: the project's held-out chat prompts with their target responses, in Gemma's
  chat format (ep_store.stages.prompts); put it first (``chat,builtin``) so a token budget keeps it.
- ``*.txt`` (one document per file), ``*.jsonl``, ``*.csv``, ``*.parquet``, ``*.arrow`` and
  Hugging Face ``datasets`` folders written by ``save_to_disk`` (one document per row, its
  ``text`` field or ``--text-field``), read by ep_store.stages.readers: a BOM stripped,
  CRLF and U+2028 kept as they are, so offsets index the file's text; empty rows skipped.
- ``chat:FILE``: a file of that kind whose texts are in Gemma's chat format, turn markers
  included (the refusal study harvests its chat-formatted prompts this way).
- ``hf:NAME[:CONFIG][:SPLIT]``: a Hugging Face dataset streamed through ``datasets``, read only
  up to the harvest's token budget (ep_store.stages.hub; issue 21, item 5).
- Pre-tokenized corpora (issue 21, item 5): a record file or ``datasets`` folder whose
  ``--text-field`` holds lists of token ids (``input_ids``, as SAELens activation caches and
  tokenized datasets store them). The ids are harvested as they are, never re-tokenized, after
  the BOS policy's prefix (harvest a cache whose rows start with BOS with ``--bos never``);
  each token's text is what the tokenizer decodes it to (byte pieces of one character: the
  first holds the character, the rest are empty), and the document's text is their
  concatenation, so offsets tile it as for text. An id beyond the tokenizer's vocabulary is
  refused (the corpus was tokenized for another model).

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
import itertools
import re
import sysconfig
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from ep_store.errors import UsageError
from ep_store.stages import readers
from ep_store.stages.prompts import labelled_spans

MIN_DOCSTRING_CHARS = 400  # shorter module docstrings are mostly one-line summaries


@dataclass(frozen=True)
class Document:
    doc_id: int
    name: str
    text: str
    chat: bool = False  # the text carries chat formatting (the ``chat`` source): its turn markers are control tokens
    token_ids: tuple[int, ...] | None = None  # a pre-tokenized document: these ids, never re-tokenized (text is "")


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


STDLIB_PACKAGES = ("asyncio", "email", "xml", "importlib", "logging", "http")
"""Standard-library packages of the ``stdlib`` source and of the built-in stdlib_topic tasks."""


def stdlib_texts() -> Iterator[tuple[str, str]]:
    """(name, source) of the ``STDLIB_PACKAGES`` ``.py`` files (tests left out), round-robin over
    the packages in sorted file order; files that are not UTF-8 are skipped."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [[p for p in sorted((stdlib / pkg).rglob("*.py")) if not {"test", "tests"} & set(p.parts)]
             for pkg in STDLIB_PACKAGES]
    for path in (p for group in itertools.zip_longest(*files) for p in group if p is not None):
        try:
            yield f"source:{path.relative_to(stdlib)}", path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue


def chat_texts() -> Iterator[tuple[str, str]]:
    from ep_store.stages.prompts import chat_stream_texts

    yield from chat_stream_texts()


def file_texts(path: Path, text_field: str = "text") -> Iterator[tuple[str, str | tuple[int, ...]]]:
    """(name, text) of a corpus file, read by ep_store.stages.readers (issue 18, B5): a .txt file is
    one document; .jsonl/.csv/.parquet/.arrow rows give one document each (their ``text_field``).
    A field of token-id lists gives (name, ids) instead (a pre-tokenized corpus; issue 21, item 5)."""
    tokenized = readers.read_token_rows(path, text_field, what="corpus file")
    if tokenized is not None:
        yield from tokenized
        return
    for row in readers.read_texts(path, text_field, txt="document", what="corpus file"):
        yield row.name, row.text


def iter_documents(spec: str, text_field: str = "text", budget=None) -> Iterator[Document]:
    """Documents of a corpus spec, in a deterministic order with ordinal ids. ``budget`` bounds
    what an ``hf:`` stream reads (``hub_texts``); other sources are read whole."""
    doc_id = 0
    for source in (s.strip() for s in spec.split(",")):
        if source.startswith("hf:"):
            from ep_store.stages.hub import hub_texts

            texts = hub_texts(source, text_field, budget)
        elif source == "builtin":
            texts = builtin_texts()
        elif source == "chat":
            texts = chat_texts()
        elif source == "stdlib":
            texts = stdlib_texts()
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
            if isinstance(text, tuple):
                yield Document(doc_id, name, "", token_ids=text)
                doc_id += 1
            elif isinstance(text, str) and text.strip():
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
    from ep_store.stages.prompts import CONTROL

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


PIECE_CHARS = 1 << 16
"""Longest piece of a document tokenized in one call (issue 18, B6): a document is tokenized
piece by piece, as the stream is read, so a harvest's time and memory follow the tokens it
keeps, not the file size. Documents up to this length are one piece (tokenized whole)."""


def piece_bounds(text: str, piece_chars: int = PIECE_CHARS) -> Iterator[tuple[int, int]]:
    """(start, end) of consecutive pieces that tile ``text``, each at most ``piece_chars`` long.

    A cut goes before a single space between two non-space characters (``a| b``), the last
    one in the piece's second half, so the space starts the next word as it would in the
    whole text: for a tokenizer whose pre-tokenizer splits at whitespace (BPE with
    Whitespace/ByteLevel, SentencePiece's split_by_whitespace) the ids equal the whole
    document's. Only a second half with no such space (e.g. 32K characters without a word
    break) is cut at the limit, where ids may differ from tokenizing the whole; offsets
    stay exact either way. The cuts depend on the text alone, so a stream stays a pure
    function of (corpus, tokenizer, ctx).
    """
    at, n = 0, len(text)
    while n - at > piece_chars:
        cut = _safe_cut(text, at + piece_chars // 2, at + piece_chars)
        yield at, cut
        at = cut
    yield at, n


def _safe_cut(text: str, lo: int, hi: int) -> int:
    """The last ``c`` in (lo, hi] with a single space at ``c`` between two non-space
    characters; else ``hi``, moved left off combining marks (a letter keeps its accents)."""
    c = text.rfind(" ", lo + 1, hi + 1)
    while c > lo:
        if not text[c - 1].isspace() and c + 1 < len(text) and not text[c + 1].isspace():
            return c
        c = text.rfind(" ", lo + 1, c)
    while hi > lo + 1 and unicodedata.combining(text[hi]):
        hi -= 1
    return hi


def document_tokens(doc: Document, tokenizer, piece_chars: int = PIECE_CHARS
                    ) -> Iterator[tuple[list[int], list[tuple[int, int]]]]:
    """(ids, tiling spans) of a document, piece by piece (``piece_bounds``), lazily: a reader
    that stops early never tokenizes the rest. Spans are offsets into ``doc.text`` and tile it
    across pieces (``tiling_spans`` carried over)."""
    end = None
    for a, b in piece_bounds(doc.text, piece_chars):
        ids, raw = encode(tokenizer, doc.text[a:b], chat=doc.chat)
        spans = []
        for s, e in raw:
            start = s + a if end is None else end
            end = max(e + a, start)
            spans.append((start, end))
        yield ids, spans


def token_texts(tokenizer, ids: tuple[int, ...], where: str) -> list[str]:
    """The text of each id of a pre-tokenized document: what the tokenizer decodes it to. Byte
    pieces that decode only together (an emoji split over several ids) give the character to
    the first piece and "" to the rest. UsageError for an id beyond the vocabulary."""
    vocab = len(tokenizer)
    bad = next((t for t in ids if t >= vocab), None)
    if bad is not None:
        raise UsageError(f"{where}: token id {bad} is beyond the tokenizer's vocabulary of {vocab}; the corpus was "
                         "tokenized for another model")
    pieces: list[str] = []
    at = 0
    while at < len(ids):
        for width in range(1, 5):  # a UTF-8 character spans at most 4 byte pieces
            text = tokenizer.decode(list(ids[at : at + width]))
            if not text.endswith("\ufffd") or at + width >= len(ids):
                break
        if text.endswith("\ufffd"):
            width, text = 1, tokenizer.decode([ids[at]])  # no completion: the piece as it decodes alone
        pieces += [text] + [""] * (width - 1)
        at += width
    return pieces


def _pretokenized(doc: Document, tokenizer) -> tuple[str, list[tuple[list[int], list[tuple[int, int]]]]]:
    """(text, [(ids, tiling spans)]) of a pre-tokenized document."""
    pieces = token_texts(tokenizer, doc.token_ids, f"corpus document {doc.name}")
    spans, at = [], 0
    for piece in pieces:
        spans.append((at, at + len(piece)))
        at += len(piece)
    return "".join(pieces), [(list(doc.token_ids), spans)]


def iter_contexts(documents, tokenizer, ctx: int, piece_chars: int = PIECE_CHARS) -> Iterator[Context]:
    """Cut each document's tokens into consecutive contexts of at most ``ctx`` tokens.

    Documents are tokenized in pieces of at most ``piece_chars`` characters as contexts are
    asked for (issue 18, B6), so taking the first N tokens costs about N tokens' work;
    pre-tokenized documents are taken as they are."""
    for doc in documents:
        ids: list[int] = []
        spans: list[tuple[int, int]] = []
        pos = 0
        text, chunks = (_pretokenized(doc, tokenizer) if doc.token_ids is not None
                        else (doc.text, document_tokens(doc, tokenizer, piece_chars)))
        for piece_ids, piece_spans in chunks:
            ids += piece_ids
            spans += piece_spans
            while len(ids) >= ctx:
                yield Context(doc.doc_id, pos, ids[:ctx], spans[:ctx], [text[a:b] for a, b in spans[:ctx]])
                ids, spans, pos = ids[ctx:], spans[ctx:], pos + ctx
        if ids:
            yield Context(doc.doc_id, pos, ids, spans, [text[a:b] for a, b in spans])


def document_texts(spec: str) -> dict[int, str]:
    """doc_id -> text for a spec (used to print contexts around tokens)."""
    return {doc.doc_id: doc.text for doc in iter_documents(spec)}


def span_labels(corpus: str, text_field: str = "text", documents: int | None = None) -> pa.Table:
    """(doc_id, char_start, char_end, label) for chat-turn markers and refusal text in a corpus
    (its spec and text field as the harvest's metadata records them; its first ``documents``
    documents, all if None: an hf: stream stops there)."""
    rows = [{"doc_id": d.doc_id, "char_start": s, "char_end": e, "label": label}
            for d in itertools.islice(iter_documents(corpus, text_field), documents)
            for s, e, label in labelled_spans(d.text)]
    return pa.Table.from_pylist(rows, schema=pa.schema([("doc_id", pa.int64()), ("char_start", pa.int32()),
                                                        ("char_end", pa.int32()), ("label", pa.string())]))


def dataset_span_labels(meta: dict) -> pa.Table:
    """``span_labels`` of the corpus an activation dataset's metadata records (its spec and
    text field); the provider ``StoreDB(span_labels=...)`` takes."""
    documents = (meta.get("fingerprint") or {}).get("corpus_documents")
    return span_labels(meta.get("corpus", "builtin"), meta.get("text_field", "text"), documents)
