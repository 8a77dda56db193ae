"""Which activation datasets hold the same documents (issue 18, A3).

Pairing the tokens of two datasets (a membership match, the ``same_tokens`` and
``transitions`` questions, a diff's token flows, a dictionary assigned over another
dataset's activations, an SAE compared on the rows of the dataset it was trained on) is
only meaningful when both were harvested from the same documents: doc ids are ordinals of
a corpus spec and character spans are offsets into its texts, so two corpora line up
unrelated text position by position. ``require_same_stream`` refuses such a pair in one line.

Design: at harvest the dataset's metadata records, beside the tokenizer and model
fingerprints (``meta["fingerprint"]``), ``corpus_fingerprint``: a sha256 over
the **whole document list the corpus spec yields** (not only the documents the token
budget reached), in doc_id order, each document as its doc_id and its exact text, length
prefixed (so no concatenation of texts can collide with another), and ``corpus_documents``,
the length of that list. Hence:

- batch size, ctx, ``--max-tokens`` and resumes do not change it: two harvests of one
  corpus with different token budgets share it, and the tokens they share (the shorter
  one's rows, a prefix of the same document list) pair up;
- any change to any document's text (or to the list) changes it, even in documents the
  budget never reached; a resume whose corpus changed that way is refused at harvest
  (``ep_store.stages.plan.check_fingerprints``), because the dataset's rows would then come from two
  document lists under one fingerprint;
- texts, not tokens: two models with different tokenizers over one corpus are the same
  stream (membership matching then joins on character spans).

Stricter than strictly needed: a dataset of ``builtin`` and one of ``builtin,mine.jsonl``
share their first documents but have different fingerprints and are refused (harvest both
from the same ``--corpus``). Datasets harvested before fingerprints were recorded carry no
key and are refused with a hint to re-harvest them (``ep harvest ... --overwrite``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from ep_store.errors import UsageError
from ep_store.keys import ActivationKey
from ep_store.store.core import Store

FINGERPRINT_KEY = "corpus_fingerprint"
DOCUMENTS_KEY = "corpus_documents"
# Both live in the dataset's ``fingerprint`` metadata with the tokenizer and model fingerprints:
# what the rows depend on beside the harvest options, checked on resume (ep_store.stages.harvest).


def corpus_fingerprint(documents: Iterable) -> dict:
    """``{corpus_fingerprint: sha256 hex, corpus_documents: n}`` of a corpus's whole document list.

    ``documents``: ``corpus.Document`` objects (``doc_id``, ``text``) in doc_id order. Each
    document feeds its doc_id (8 bytes, little endian), the byte length of its UTF-8 text
    (8 bytes) and the text itself, so no two different lists hash the same bytes. A
    pre-tokenized document (``token_ids``; issue 21, item 5) feeds 2**63 + its id count in
    place of the byte length, then each id (8 bytes), so it never hashes like a text.
    """
    digest, n = hashlib.sha256(b"ep_store corpus v1\0"), 0
    for doc in documents:
        digest.update(int(doc.doc_id).to_bytes(8, "little", signed=True))
        ids = getattr(doc, "token_ids", None)
        if ids is not None:
            digest.update((2**63 + len(ids)).to_bytes(8, "little"))
            digest.update(b"".join(int(t).to_bytes(8, "little") for t in ids))
        else:
            text = doc.text.encode("utf-8", "surrogatepass")
            digest.update(len(text).to_bytes(8, "little"))
            digest.update(text)
        n += 1
    return {FINGERPRINT_KEY: digest.hexdigest(), DOCUMENTS_KEY: n}


def stream_identity(store: Store, key: ActivationKey) -> dict:
    """The corpus identity an activation dataset recorded at harvest: ``corpus`` (the spec),
    ``corpus_fingerprint`` and ``corpus_documents`` (the last two None when it predates them).
    Raises UsageError when there is no such dataset."""
    path = store.require_activations(key)
    meta = store.info(path).meta
    recorded = meta.get("fingerprint") or {}
    return {"corpus": meta.get("corpus"), FINGERPRINT_KEY: recorded.get(FINGERPRINT_KEY),
            DOCUMENTS_KEY: recorded.get(DOCUMENTS_KEY)}


def require_same_stream(store: Store, a: ActivationKey, b: ActivationKey, what: str, other_way: str = "") -> None:
    """Refuse (UsageError, one line naming both datasets and the fix) to pair the tokens of
    activation datasets ``a`` and ``b`` unless both were harvested from the same documents.

    ``what`` names the operation (e.g. ``"membership match"``); ``other_way`` is an optional
    alternative that needs no shared tokens (e.g. ``"or use --method vector"``). A dataset
    without a recorded fingerprint (harvested before issue 18) is refused with a hint to
    re-harvest it. The same key on both sides always passes.
    """
    if a == b:
        stream_identity(store, a)
        return
    ia, ib = stream_identity(store, a), stream_identity(store, b)
    alt = f" ({other_way})" if other_way else ""
    for key, ident in ((a, ia), (b, ib)):
        if ident[FINGERPRINT_KEY] is None:
            raise UsageError(f"{what}: {key} was harvested before corpus fingerprints were recorded, so it cannot be "
                             f"shown to hold the same documents as {b if key == a else a}; re-harvest it with "
                             f"ep harvest --corpus {ident['corpus'] or 'SPEC'} ... --overwrite{alt}")
    if ia[FINGERPRINT_KEY] != ib[FINGERPRINT_KEY]:
        raise UsageError(f"{what}: {a} (corpus {ia['corpus']!r}, {ia[DOCUMENTS_KEY]} documents) and {b} (corpus "
                         f"{ib['corpus']!r}, {ib[DOCUMENTS_KEY]} documents) hold different documents, so their tokens "
                         f"cannot be paired; harvest both from the same --corpus{alt}")
