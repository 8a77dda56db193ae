"""The registry of canned questions: every ep_store/sql/queries/*.sql file, named by its file.

Each file starts with a header that declares the question (issue 8, item 12; the one
source of truth for ``ep stats --help``, the command's options and the binding in
ep_store.sql.db):

    -- <description, one line>
    -- params: model, checkpoint, layer, hook, percentile, limit, context
    -- needs: match, span_labels, same_stream   (optional)

``params`` are the DuckDB named parameters the statement uses (a test checks them against
DuckDB's parser). A question is a *pair* question when it names ``a``/``b`` parameters (two
dictionaries: ``ep stats A QUESTION --against B``), otherwise it asks about one dictionary
(``ep stats KEY QUESTION``). The key parameters come from the dictionary keys (``key`` is the
whole key as text, as the matches views spell it); the others
are options with the defaults below. ``needs: match`` means ``ep match A B`` must have run
(the question reads the ``matches``/``match_overlaps`` views); ``span_labels`` is the table
of labelled character spans of B's corpus, which ep_store.sql.db registers on demand;
``same_stream`` means the question pairs tokens of A's and B's activation datasets, so both
must hold the same documents (``streams.require_same_stream``, checked before it runs;
issue 18, A3).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources

KEY_PARAMS = frozenset({"model", "checkpoint", "layer", "hook", "percentile"})
PAIR_PARAMS = frozenset({"a", "b"} | {f"{side}_{k}" for side in "ab" for k in KEY_PARAMS})
# ``key``: the dictionary key as the matches views spell it (tiny/base/L1/p10); a filter on it
# prunes the view parts of other matches, stale ones included (issue 18, A1).
DICTIONARY_PARAMS = KEY_PARAMS | {"key"}
# Options a question may take, with their defaults and what they mean (ep stats shows these).
OPTIONS = {
    "limit": (20, "regions (or rows) to show"),
    "context": (8, "tokens of context either side"),
    "per_region": (3, "contexts per region"),
    "top": (5, "top tokens per region"),
    "top_n": (100, "tokens a feature is binarised to: its top positive activations (ep sae compare)"),
    "min_positives": (20, "positive tokens a feature needs to be eligible (ep sae compare)"),
}
DEFAULTS = {name: default for name, (default, _) in OPTIONS.items()}
NEEDS = frozenset({"match", "span_labels", "same_stream"})  # what a ``-- needs:`` line may name


@dataclass(frozen=True)
class Question:
    name: str
    description: str
    sql: str
    params: tuple[str, ...]
    """Every DuckDB named parameter of ``sql``, as declared in its header."""
    needs: tuple[str, ...] = ()
    """What must exist besides the store's views: ``match`` (ep match A B), ``span_labels``,
    ``same_stream`` (A's and B's activations hold the same documents)."""

    @property
    def pair(self) -> bool:
        """True when the question compares two dictionaries (A and B)."""
        return any(p in PAIR_PARAMS for p in self.params)

    @property
    def options(self) -> tuple[str, ...]:
        """The parameters the user may set (not filled from dictionary keys)."""
        return tuple(p for p in self.params if p in OPTIONS)

    def usage(self) -> str:
        """One help line: name, how it is run, its options, what it needs, description."""
        opts = "".join(f" [--{o.replace('_', '-')}]" for o in self.options)
        runs = "A {name} --against B" if self.pair else "KEY {name}"
        needs = " (run ep match A B first)" if "match" in self.needs else ""
        return f"{runs.format(name=self.name)}{opts}: {self.description}{needs}"


def parse(name: str, text: str) -> Question:
    """A question from its .sql text; ValueError if the header is not as documented."""
    lines = text.splitlines()
    if not lines or not lines[0].startswith("--"):
        raise ValueError(f"queries/{name}.sql: the first line must be a '-- description' comment")
    header = {}
    for line in lines[1:]:
        if not line.startswith("--"):
            break
        field, _, value = line.lstrip("- ").partition(":")
        header[field.strip()] = tuple(v.strip() for v in value.split(",") if v.strip())
    if "params" not in header:
        raise ValueError(f"queries/{name}.sql: the second line must be '-- params: ...'")
    unknown = set(header["params"]) - DICTIONARY_PARAMS - PAIR_PARAMS - set(OPTIONS)
    if unknown:
        raise ValueError(f"queries/{name}.sql: unknown parameters {sorted(unknown)}")
    unknown = set(header.get("needs", ())) - NEEDS
    if unknown:
        raise ValueError(f"queries/{name}.sql: unknown needs {sorted(unknown)}; known: {sorted(NEEDS)}")
    return Question(name, lines[0].lstrip("- ").strip(), text, header["params"], header.get("needs", ()))


@cache
def questions() -> dict[str, Question]:
    """Every canned question by name, in file-name order."""
    found = {}
    for entry in sorted(resources.files("ep_store.sql.queries").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".sql"):
            found[entry.name[:-4]] = parse(entry.name[:-4], entry.read_text())
    return found
