"""The registry of canned questions: every ep_store/queries/*.sql file, named by its file.

The first comment line of each file describes it (shown by ``ep stats --help``); its
parameters are DuckDB named parameters ($model, $checkpoint, $layer, $percentile, $limit,
$context, $per_region, $top).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources


@dataclass(frozen=True)
class Question:
    name: str
    description: str
    sql: str


@cache
def questions() -> dict[str, Question]:
    found = {}
    for entry in sorted(resources.files("ep_store.queries").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".sql"):
            text = entry.read_text()
            first = text.splitlines()[0].lstrip("- ").strip()
            found[entry.name[:-4]] = Question(entry.name[:-4], first, text)
    return found
