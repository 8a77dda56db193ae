"""Labelled texts for the evaluations: user files, and built-in tasks that exist offline.

Built-in probe tasks (issue 10; every text is read at run time from what a Python install
and this package already hold, never downloaded; sizes are caps per class, sampled with a
fixed seed; texts are cut to their first ``max_tokens_per_text`` tokens by the evaluation):

| task               | classes                                     | per class | text source |
|--------------------|---------------------------------------------|-----------|-------------|
| ``harmful_requests`` | harmful, benign                           | 120 | the project's chat prompts (ep_store/stages/data/chat_{train,heldout}.jsonl), plain text |
| ``text_source``    | docs, chat, code                            | 100 | interpreter help topics (pydoc_data); chat prompt+response in Gemma's chat format; 12-line chunks of standard-library ``.py`` source |
| ``stdlib_topic``   | asyncio, email, xml, importlib, logging, http | 50 | docstrings (>= 120 chars) of modules, classes and functions of these standard-library packages, labelled by top-level package |

Built-in concepts (AxBench latent-detection format: concept, text, label in positive /
negative / hard negative; negatives with an empty concept are shared by every concept):
one concept per ``stdlib_topic`` package (positives: its docstrings; hard negatives: other
packages' docstrings), ``refusal`` (positives: harmful prompts with the planted refusal
response; hard negatives: benign prompts with their answers) and ``python source code``
(positives: source chunks; hard negatives: docstrings); shared negatives: help topics.
"""

from __future__ import annotations

import ast
import logging
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ep_store.errors import UsageError
from ep_store.stages import readers
from ep_store.stages.corpus import STDLIB_PACKAGES

log = logging.getLogger(__name__)

SEED = 0
TOPIC_PACKAGES = STDLIB_PACKAGES  # the harvest's ``stdlib`` source reads the same packages
MIN_DOCSTRING_CHARS = 120
CODE_LINES = 12


@dataclass
class LabelledTexts:
    """One probe task: texts with one label each."""

    name: str
    texts: list[str]
    labels: list[str]


def _sample(items: list, n: int, seed: int = SEED) -> list:
    if len(items) <= n:
        return list(items)
    idx = np.sort(np.random.default_rng(seed).choice(len(items), n, replace=False))
    return [items[i] for i in idx]


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def help_topics() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics) if len(topics[name]) >= MIN_DOCSTRING_CHARS]


def package_docstrings(package: str) -> list[str]:
    """Docstrings (>= 120 chars) of a standard-library package's modules, classes and functions."""
    out = []
    for path in sorted((_stdlib() / package).rglob("*.py")):
        if "test" in path.parts or "tests" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= MIN_DOCSTRING_CHARS:
                    out.append(doc)
    return out


def source_chunks() -> list[str]:
    """Chunks of CODE_LINES non-blank lines of top-level standard-library modules' source."""
    out = []
    for path in sorted(_stdlib().glob("*.py")):
        try:
            lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except UnicodeDecodeError:
            continue
        out += ["\n".join(lines[i : i + CODE_LINES]) for i in range(40, len(lines) - CODE_LINES, 10 * CODE_LINES)]
    return out


def chat_rows() -> list[dict]:
    from ep_store.stages import prompts

    return prompts.load("train") + prompts.load("heldout")


def harmful_requests(per_class: int = 120) -> LabelledTexts:
    rows = chat_rows()
    harmful = _sample([r["prompt"] for r in rows if r["harmful"]], per_class)
    benign = _sample([r["prompt"] for r in rows if not r["harmful"]], per_class)
    return LabelledTexts("harmful_requests", harmful + benign, ["harmful"] * len(harmful) + ["benign"] * len(benign))


def text_source(per_class: int = 100) -> LabelledTexts:
    from ep_store.stages.prompts import chat_text

    parts = {
        "docs": _sample(help_topics(), per_class),
        "chat": _sample([chat_text(r["prompt"], r["response"]) for r in chat_rows()], per_class),
        "code": _sample(source_chunks(), per_class),
    }
    return LabelledTexts("text_source", [t for v in parts.values() for t in v],
                         [k for k, v in parts.items() for _ in v])


def stdlib_topic(per_class: int = 50) -> LabelledTexts:
    texts, labels = [], []
    for package in TOPIC_PACKAGES:
        docs = _sample(package_docstrings(package), per_class)
        texts += docs
        labels += [package] * len(docs)
    return LabelledTexts("stdlib_topic", texts, labels)


BUILTIN_TASKS = {"harmful_requests": harmful_requests, "text_source": text_source, "stdlib_topic": stdlib_topic}


def builtin_tasks(names: str = "builtin") -> list[LabelledTexts]:
    """``builtin`` = every built-in task; or comma-separated task names."""
    wanted = list(BUILTIN_TASKS) if names == "builtin" else [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in BUILTIN_TASKS]
    if unknown:
        raise UsageError(f"unknown built-in task {unknown[0]!r}; choose from builtin, {', '.join(BUILTIN_TASKS)}")
    return [BUILTIN_TASKS[n]() for n in wanted]


# -- user files ---------------------------------------------------------------------------------
def read_rows(path: Path) -> list[dict]:
    """Rows of a .jsonl, .csv or .parquet file as dicts, read by ep_store.stages.readers (issue 18, B5:
    strict UTF-8, a BOM stripped, CSV values as strings); UsageError when unreadable."""
    return [record for _, record in readers.read_records(path, "data file")]


def require_fields(rows: list[dict], fields: list[str], path: Path, hint: str = "") -> None:
    if not rows:
        raise UsageError(f"{path} holds no rows")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UsageError(f"{path} row {i} is not an object with named fields")
        missing = [f for f in fields if f not in row or row[f] is None]
        if missing:
            raise UsageError(f"{path} row {i} has no field {missing[0]!r} (fields: {', '.join(map(str, row))}){hint}")


def file_task(path: Path, text_field: str = "text", label_field: str = "label") -> LabelledTexts:
    """A probe task from a user file with a text field and a label field (ep_store.stages.readers:
    rows with an empty or whitespace-only text are skipped, counted in a warning)."""
    readers.check_file(path, "data file", readers.RECORD_FORMATS)
    rows = readers.read_texts(path, text_field, what="data file", also=[label_field])
    require_fields([r.record for r in rows], [label_field], path, "; pass --label-field")
    return LabelledTexts(path.stem, [r.text for r in rows], [str(r.record[label_field]) for r in rows])


def probe_tasks(data: str, text_field: str = "text", label_field: str = "label") -> list[LabelledTexts]:
    """``builtin`` (or built-in task names) or a file path."""
    if data == "builtin" or all(n.strip() in BUILTIN_TASKS for n in data.split(",")):
        return builtin_tasks(data)
    return [file_task(Path(data), text_field, label_field)]


# -- concepts (AxBench format) -----------------------------------------------------------------
POSITIVE, NEGATIVE, HARD = "positive", "negative", "hard negative"


@dataclass
class ConceptRow:
    concept: str
    """Concept name; empty for a negative shared by every concept."""
    text: str
    label: str
    """positive, negative or hard negative."""


def builtin_concepts(per_concept: int = 30, hard_per_concept: int = 15, shared_negatives: int = 60) -> list[ConceptRow]:
    from ep_store.stages.prompts import chat_text

    rows: list[ConceptRow] = []
    docs = {p: package_docstrings(p) for p in TOPIC_PACKAGES}
    for i, package in enumerate(TOPIC_PACKAGES):
        rows += [ConceptRow(package, t, POSITIVE) for t in _sample(docs[package], per_concept)]
        others = [t for q in TOPIC_PACKAGES if q != package for t in _sample(docs[q], per_concept)]
        rows += [ConceptRow(package, t, HARD) for t in _sample(others, hard_per_concept, SEED + 1 + i)]
    chat = chat_rows()
    rows += [ConceptRow("refusal", chat_text(r["prompt"], r["response"]), POSITIVE)
             for r in _sample([r for r in chat if r["harmful"]], per_concept)]
    rows += [ConceptRow("refusal", chat_text(r["prompt"], r["response"]), HARD)
             for r in _sample([r for r in chat if not r["harmful"]], hard_per_concept)]
    rows += [ConceptRow("python source code", t, POSITIVE) for t in _sample(source_chunks(), per_concept)]
    all_docs = [t for p in TOPIC_PACKAGES for t in _sample(docs[p], per_concept)]
    rows += [ConceptRow("python source code", t, HARD) for t in _sample(all_docs, hard_per_concept, SEED + 99)]
    rows += [ConceptRow("", t, NEGATIVE) for t in _sample(help_topics(), shared_negatives)]
    return rows


# AxBench's own column names (axbench concept500 files): output_concept, input, output, category.
AXBENCH_LABELS = {"positive": POSITIVE, "negative": NEGATIVE, "hard negative": HARD, "hard_negative": HARD}
PLAIN_LABELS = {**AXBENCH_LABELS, "1": POSITIVE, "0": NEGATIVE, "true": POSITIVE, "false": NEGATIVE,
                "hard": HARD}


def concept_rows_from_file(path: Path) -> list[ConceptRow]:
    """Plain rows (concept, text, label) or AxBench rows (output_concept, output or input,
    category); AxBench negatives whose concept is not any positive's concept (its "EEEEE"
    placeholder) are shared by every concept."""
    rows = read_rows(path)
    axbench = bool(rows) and isinstance(rows[0], dict) and "output_concept" in rows[0]
    if axbench:
        text_field = "output" if "output" in rows[0] else "input"
        require_fields(rows, ["output_concept", text_field, "category"], path)
        fields = ("output_concept", text_field, "category")
    else:
        require_fields(rows, ["concept", "text", "label"], path,
                       "; use concept/text/label, or AxBench's output_concept/output/category")
        fields = ("concept", "text", "label")
    out = []
    for i, row in enumerate(rows):
        concept, _, label = (row[f] for f in fields)
        norm = PLAIN_LABELS.get(str(label).strip().lower())
        if norm is None:
            raise UsageError(f"{path} row {i}: label {label!r} is not positive, negative or hard negative")
        text = readers.row_text(path, i, row, fields[1:2], "data file")  # NUL, surrogates, non-text refused
        if text.strip():  # empty texts are skipped, as every reader does (issue 18, B5)
            out.append(ConceptRow(str(concept), text, norm))
    if len(out) < len(rows):
        log.warning("data file %s: skipped %d empty or whitespace-only text(s) of %d", path, len(rows) - len(out),
                    len(rows))
    positives = {r.concept for r in out if r.label == POSITIVE}
    for r in out:
        if r.label == NEGATIVE and r.concept not in positives:
            r.concept = ""  # shared negative
    return out


def concept_rows(data: str) -> list[ConceptRow]:
    return builtin_concepts() if data == "builtin" else concept_rows_from_file(Path(data))


def iter_unique(texts: list[str]) -> Iterator[tuple[str, int]]:
    seen: dict[str, int] = {}
    for t in texts:
        if t not in seen:
            seen[t] = len(seen)
            yield t, seen[t]
