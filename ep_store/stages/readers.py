"""One way to read a user's input file (issue 18, B5): ``.txt``, ``.jsonl``, ``.csv``, ``.parquet``,
``.arrow`` and Hugging Face ``datasets`` folders (``Dataset.save_to_disk``; issue 21, item 5).

Every command that reads texts from a file goes through here: ``ep harvest --corpus``
(ep_store.stages.corpus), ``ep generate --prompts`` (ep_store.studies.generate), ``ep eval probe/concepts
--data`` (ep_store.evaluate.tasks) and ``ep eval ood --ood-corpus``. The rules:

- Bytes are UTF-8. Invalid UTF-8 is refused with one line naming the file and the byte
  offset. A UTF-8 BOM at the very start of a file is an encoding mark, not text: it is
  stripped (a BOM anywhere else is an ordinary character).
- Text is returned exactly as the file holds it: no newline translation (CRLF stays
  ``"\\r\\n"``), no Unicode normalisation, and U+2028, U+2029, U+0085 are ordinary characters
  inside a text. So character offsets (``char_start``/``char_end`` stored at harvest) index the
  text as this module returns it, the same for every format: a ``.txt`` file and a ``.jsonl``
  row holding the same string give the same offsets.
- ``.txt``: as a corpus, one document per file (the whole file after the BOM); as prompts,
  one text per line, lines split on ``"\\n"`` only, with the ``"\\r"`` of a ``"\\r\\n"`` ending
  removed (never on U+2028/U+2029/U+0085, which ``str.splitlines`` would split on).
- ``.jsonl``: one JSON object per line, lines split on ``"\\n"`` only (blank lines skipped).
  ``.csv``: a header row, then RFC 4180 records (quoted fields may hold line breaks); every
  value is a string. ``.parquet`` and ``.arrow`` (Arrow IPC, stream or file): rows of the
  file's columns. A folder written by ``datasets``' ``save_to_disk``: the rows of its Arrow
  shards in the order its state.json lists them (so doc ids are deterministic).
- The text field (``--text-field``, ``text`` by default) must exist: otherwise one line naming
  the file, the fields it has and ``--text-field``. A value that is not a string (a number, a
  list) is refused naming the row; a null counts as empty.
- NUL (U+0000) in a text is refused (naming the file and the byte offset or row): it marks a
  binary or UTF-16 file, and the token-stream digest separates tokens with NUL. A lone
  surrogate (JSON ``"\\ud83d"``) is refused: it is no text.
- Empty and whitespace-only texts are skipped, the same way in every format, and counted in
  one warning per file.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ep_store.errors import UsageError

log = logging.getLogger(__name__)

FORMATS = (".txt", ".jsonl", ".csv", ".parquet", ".arrow")
RECORD_FORMATS = (".jsonl", ".csv", ".parquet", ".arrow")
DATASET_STATE = "state.json"  # what Hugging Face ``Dataset.save_to_disk`` writes beside its Arrow shards


@dataclass(frozen=True)
class TextRow:
    """One text of a file: ``name`` is ``file`` (a whole .txt) or ``file:i`` (record or line
    ``i``, 0-based, blank lines counted), ``record`` the row's fields (for labels)."""

    name: str
    text: str
    record: dict


def check_file(path: Path, what: str, formats: Sequence[str] = FORMATS) -> str:
    """The lower-case suffix of an existing file of one of ``formats``; UsageError otherwise."""
    kinds = "/".join(formats)
    if path.is_dir():
        raise UsageError(f"{what} {path} is a folder; pass a {kinds} file")
    if not path.is_file():
        raise UsageError(f"{what} {path} does not exist; pass a {kinds} file")
    suffix = path.suffix.lower()
    if suffix not in formats:
        raise UsageError(f"{what} {path} is not a {kinds} file")
    return suffix


def read_text(path: Path, what: str = "file") -> str:
    """The whole file as text: strict UTF-8, a leading BOM stripped, nothing else changed.
    UsageError naming the byte offset of invalid UTF-8 or of a NUL."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UsageError(f"cannot read {what} {path}: {err.strerror or err}") from None
    skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[skip:].decode("utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"{what} {path} is not UTF-8 text: invalid byte 0x{data[skip + err.start]:02x} at byte "
                         f"offset {skip + err.start}; convert it to UTF-8") from None
    nul = text.find("\0")
    if nul >= 0:
        at = skip + len(text[:nul].encode("utf-8"))
        raise UsageError(f"{what} {path} holds a NUL byte at byte offset {at}: it is binary or UTF-16, not UTF-8 "
                         "text; convert it or remove the NUL bytes")
    return text


def split_lines(text: str) -> list[str]:
    """Lines split on ``\\n`` only; the ``\\r`` of a ``\\r\\n`` ending removed. U+2028, U+2029,
    U+0085, a lone ``\\r``, form feeds stay inside their line (``str.splitlines`` splits on them)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the file's final newline ends the last line; it starts none
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _jsonl_records(path: Path, text: str, what: str) -> list[tuple[int, dict | None]]:
    out = []
    for i, line in enumerate(split_lines(text)):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UsageError(f"{what} {path} line {i + 1} is not JSON: {err}") from None
        if not isinstance(row, dict):
            raise UsageError(f"{what} {path} line {i + 1} is not a JSON object with named fields")
        out.append((i, row))
    return out


def _csv_records(path: Path, text: str, what: str) -> list[tuple[int, dict]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        rows = [(i, {k: v for k, v in row.items() if k is not None}) for i, row in enumerate(reader)]
    except csv.Error as err:
        raise UsageError(f"{what} {path} line {reader.line_num} is not CSV: {err}") from None
    if reader.fieldnames is None:
        raise UsageError(f"{what} {path} is empty; a CSV file needs a header row of field names")
    return rows


def _parquet_records(path: Path, what: str, columns: Sequence[str] | None) -> list[tuple[int, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        wanted = None if columns is None else [c for c in names if c in columns]
        return list(enumerate(pq.read_table(path, columns=wanted).to_pylist()))
    except (pa.ArrowException, OSError, UnicodeDecodeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"cannot read {what} {path} as Parquet: {first}") from None


def parquet_fields(path: Path, what: str) -> list[str]:
    """Column names of a Parquet file; UsageError when it is not one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return list(pq.read_schema(path).names)
    except (pa.ArrowException, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"cannot read {what} {path} as Parquet: {first}") from None


def _arrow_records(path: Path, what: str, columns: Sequence[str] | None) -> list[tuple[int, dict]]:
    """Rows of an Arrow IPC file, stream or file format (a Hugging Face ``datasets`` shard is a stream)."""
    import pyarrow as pa

    try:
        try:
            table = pa.ipc.open_stream(path).read_all()
        except pa.ArrowInvalid:
            table = pa.ipc.open_file(path).read_all()
    except (pa.ArrowException, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"cannot read {what} {path} as Arrow: {first}") from None
    if columns is not None:
        table = table.select([c for c in table.column_names if c in columns])
    return list(enumerate(table.to_pylist()))


def dataset_shards(path: Path, what: str) -> list[Path] | None:
    """The Arrow shards, in order, of a folder that Hugging Face ``Dataset.save_to_disk`` wrote
    (its state.json lists them); None for anything else. A ``DatasetDict`` folder (one
    sub-folder per split) is refused naming its splits."""
    if not path.is_dir():
        return None
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if (p / DATASET_STATE).is_file())
        raise UsageError(f"{what} {path} holds several splits ({', '.join(splits)}); pass one split's folder")
    if not (path / DATASET_STATE).is_file():
        return None
    try:
        files = json.loads((path / DATASET_STATE).read_text(encoding="utf-8"))["_data_files"]
        return [path / f["filename"] for f in files]
    except (ValueError, KeyError, TypeError) as err:
        raise UsageError(f"{what} {path}/{DATASET_STATE} is not a datasets state file ({err})") from None


def column_names(path: Path, suffix: str, what: str) -> list[str]:
    """Column names of a Parquet file, an Arrow file or a datasets folder (its first shard's)."""
    if suffix == ".parquet":
        return parquet_fields(path, what)
    shards = dataset_shards(path, what)
    if shards == []:
        return []
    first = shards[0] if shards else path
    import pyarrow as pa

    try:
        try:
            return list(pa.ipc.open_stream(first).schema.names)
        except pa.ArrowInvalid:
            return list(pa.ipc.open_file(first).schema.names)
    except (pa.ArrowException, OSError) as err:
        raise UsageError(f"cannot read {what} {first} as Arrow: {err.__class__.__name__}") from None


def read_records(path: Path, what: str = "data file", columns: Sequence[str] | None = None
                 ) -> list[tuple[int, dict]]:
    """(row index, fields) of every record of a .jsonl, .csv, .parquet or .arrow file, or of a
    Hugging Face ``save_to_disk`` folder (its shards in order, indices running on; blank JSONL
    lines skipped, their index counted). ``columns``: the only ones a Parquet or Arrow file
    needs to read. UsageError when the file is missing, of another kind, or unreadable."""
    shards = dataset_shards(path, what)
    if shards is not None:
        rows = [rec for shard in shards for _, rec in _arrow_records(shard, what, columns)]
        return list(enumerate(rows))
    suffix = check_file(path, what, RECORD_FORMATS)
    if suffix == ".parquet":
        return _parquet_records(path, what, columns)
    if suffix == ".arrow":
        return _arrow_records(path, what, columns)
    text = read_text(path, what)
    return _jsonl_records(path, text, what) if suffix == ".jsonl" else _csv_records(path, text, what)


def missing_field(where: str, field: str, names) -> str:
    """The one-line message for a text field that a file (or row: ``where``) does not have."""
    have = ", ".join(map(str, names)) or "none"
    return f"{where} has no field {field!r} (its fields: {have}); pass --text-field NAME"


def row_text(path: Path, index: int, record: dict, fields: Sequence[str], what: str) -> str | None:
    """The text of a record: the first of ``fields`` it has. None for a null; UsageError for
    a missing field, a non-string, a NUL or a lone surrogate."""
    field = next((f for f in fields if f in record), None)
    if field is None:
        raise UsageError(missing_field(f"{what} {path} row {index}", " or ".join(fields), record))
    value = record[field]
    if value is None:
        return None
    if not isinstance(value, str):
        raise UsageError(f"{what} {path} row {index}: field {field!r} holds {type(value).__name__} "
                         f"{str(value)[:40]!r}, not text")
    check_string(value, f"{what} {path} row {index}: field {field!r}")
    return value


def check_string(value: str, where: str) -> None:
    """UsageError when a string holds NUL or a lone surrogate (``where`` names the place)."""
    if "\0" in value:
        raise UsageError(f"{where} holds a NUL character (U+0000) at character {value.index(chr(0))}; "
                         "remove it (NUL marks binary data, not text)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise UsageError(f"{where} holds a lone surrogate {value[err.start]!r} at character {err.start}; "
                         "it is not valid Unicode text") from None


def read_token_rows(path: Path, field: str, what: str = "file") -> list[tuple[str, tuple[int, ...]]] | None:
    """(name, ids) of every row of a record file or ``datasets`` folder whose ``field`` holds lists
    of token ids (a pre-tokenized corpus, e.g. ``input_ids``; issue 21, item 5); None when the
    field holds text or the file has no such field (``read_texts`` then says what is wrong).
    Rows with no ids are skipped (one warning); a row of other values is refused naming it."""
    if dataset_shards(path, what) is None and (not path.is_file() or path.suffix.lower() not in RECORD_FORMATS):
        return None
    records = read_records(path, what, [field])
    values = [(i, rec.get(field)) for i, rec in records]
    first = next((v for _, v in values if v is not None), None)
    if not isinstance(first, (list, tuple)):
        return None
    rows = []
    for i, ids in values:
        if ids is None:  # a null counts as empty, as for text
            continue
        if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                          for t in ids):
            raise UsageError(f"{what} {path} row {i}: field {field!r} holds {str(ids)[:40]!r}, not a list of token "
                             "ids (non-negative integers)")
        if ids:
            rows.append((f"{path.name}:{i}", tuple(ids)))
    if len(rows) < len(values):
        log.warning("%s %s: skipped %d row(s) without token ids of %d", what, path, len(values) - len(rows),
                    len(values))
    return rows


def read_texts(path: Path, text_field: str | Sequence[str] = "text", txt: str = "document",
               what: str = "file", also: Sequence[str] = ()) -> list[TextRow]:
    """The non-empty texts of a file, in file order (rules: module docstring).

    ``text_field``: the field (or fields, first present wins, per row) of a record format;
    ``txt``: ``document`` (a .txt file is one text) or ``lines`` (one text per line);
    ``also``: other fields the caller reads from ``TextRow.record`` (a Parquet file reads
    only these columns). Raises UsageError for a missing file, a missing text field (naming
    the fields the file has and --text-field), or text that is not text."""
    fields = (text_field,) if isinstance(text_field, str) else tuple(text_field)
    suffix = ".arrow" if dataset_shards(path, what) is not None else check_file(path, what)
    if suffix == ".txt":
        text = read_text(path, what)
        parts = [(path.name, text)] if txt == "document" else \
            [(f"{path.name}:{i}", line) for i, line in enumerate(split_lines(text))]
        rows = [TextRow(name, t, {fields[0]: t}) for name, t in parts]
    else:
        if suffix in (".parquet", ".arrow") and not any(f in (names := column_names(path, suffix, what)) for f in fields):
            raise UsageError(missing_field(f"{what} {path}", " or ".join(fields), names))
        records = read_records(path, what, [*fields, *also])
        if suffix == ".csv" and records and not any(f in records[0][1] for f in fields):
            raise UsageError(missing_field(f"{what} {path}", " or ".join(fields), records[0][1]))
        rows = [TextRow(f"{path.name}:{i}", row_text(path, i, rec, fields, what), rec) for i, rec in records]
    kept = [r for r in rows if r.text is not None and r.text.strip()]
    if len(kept) < len(rows):
        log.warning("%s %s: skipped %d empty or whitespace-only text(s) of %d", what, path, len(rows) - len(kept),
                    len(rows))
    return kept
