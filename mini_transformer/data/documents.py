"""Documents from JSON Lines and Parquet files: the text of one field of each record, streamed.

A ``.jsonl`` (or ``.ndjson``) file holds one JSON object per line; a ``.parquet`` file holds a
table. Either way each record is one document, and its text is the string in the field (column)
named by ``data.text_field`` (default ``text``); the other fields are ignored. Blank JSON lines
and empty texts are skipped. Both readers stream: JSON Lines a line at a time (the standard
library's ``json``), Parquet a record batch of one column at a time (``pyarrow``, the
``parquet`` extra), so a file larger than memory is fine.

How the documents are joined into one token stream is the pipeline's business (see
:mod:`.pipeline`); this module only yields their texts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from ..errors import SettingError, UserError, first_line

if TYPE_CHECKING:
    from .sources import Source

DOCUMENT_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
PARQUET_BATCH_ROWS = 1024  # records read at a time: bounded memory, few calls
HASH_BLOCK = 1 << 20

# The fix for a missing or wrong field, as the command line spells it (see SettingError).
TEXT_FIELD_FIX = [{"text_field": "FIELD"}]


def document_format(path: Path) -> Optional[str]:
    """``"jsonl"`` or ``"parquet"`` for a file of documents (by its extension), else None (plain text)."""
    return DOCUMENT_FORMATS.get(path.suffix.lower())


def iter_documents(src: Source, on_bytes: Optional[Callable[[int], None]] = None,
                   hasher: Optional[hashlib._Hash] = None) -> Iterator[str]:
    """The non-empty texts of ``src``'s records, in file order; ``on_bytes`` counts file bytes read
    and ``hasher`` sees the file's bytes, as for a text file."""
    kind = document_format(src.path)
    if kind == "jsonl":
        yield from _iter_jsonl(src, on_bytes, hasher)
    elif kind == "parquet":
        yield from _iter_parquet(src, on_bytes, hasher)
    else:
        raise ValueError(f"{src.path} is not a JSON Lines or Parquet file")


# -- JSON Lines --------------------------------------------------------------------------------

def _iter_jsonl(src: Source, on_bytes, hasher) -> Iterator[str]:
    with open(src.path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if hasher is not None:
                hasher.update(raw)
            if on_bytes is not None:
                on_bytes(len(raw))
            where = f"input file {src.name!r} line {number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(f"{where} is not valid UTF-8 (byte {exc.start + 1} of the line); "
                                "convert the file to UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{where} is not valid JSON ({exc.msg} at column {exc.colno}); "
                                "fix or remove that line (each line must be one JSON object)") from None
            text = _record_text(record, src.text_field, where)
            if text:
                yield text


def _record_text(record: Any, field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise UserError(f"{where} is {_json_type(record)}, not an object; each line must be a JSON object "
                        f"with a {field!r} field")
    if field not in record:
        fields = ", ".join(list(record)[:10]) or "none"
        raise SettingError(f"{where} has no {field!r} field (its fields: {fields}); name the field that "
                           "holds the text", fixes=TEXT_FIELD_FIX)
    value = record[field]
    if not isinstance(value, str):
        raise SettingError(f"{where}: field {field!r} is {_json_type(value)}, not a string; fix the line, or "
                           "name a field that holds text", fixes=TEXT_FIELD_FIX)
    return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    for kind, name in ((bool, "a boolean"), ((int, float), "a number"), (str, "a string"), (list, "an array"),
                       (dict, "an object")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


# -- Parquet -----------------------------------------------------------------------------------

def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:  # an optional dependency (the parquet extra)
        raise UserError("reading Parquet files needs pyarrow: pip install 'mini-transformer[parquet]'") from None
    return pyarrow


def _iter_parquet(src: Source, on_bytes, hasher) -> Iterator[str]:
    pa = _pyarrow()
    if hasher is not None:  # pyarrow reads the file itself; the digest takes one more pass
        with open(src.path, "rb") as f:
            while block := f.read(HASH_BLOCK):
                hasher.update(block)
    try:
        parquet = pa.parquet.ParquetFile(src.path)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"input file {src.name!r} is not a readable Parquet file ({first_line(exc, 200)}); "
                        "check the file, or give JSON Lines or text instead") from None
    with parquet:
        schema = parquet.schema_arrow
        field = src.text_field
        if field not in schema.names:
            columns = ", ".join(schema.names[:10]) or "none"
            raise SettingError(f"input file {src.name!r} has no column {field!r} (its columns: {columns}); "
                               "name the column that holds the text", fixes=TEXT_FIELD_FIX)
        column_type = schema.field(field).type
        if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)
                or getattr(pa.types, "is_string_view", lambda _: False)(column_type)):
            raise SettingError(f"input file {src.name!r}: column {field!r} holds {column_type}, not strings; "
                               "name a column that holds text", fixes=TEXT_FIELD_FIX)
        # Progress in file bytes, pro rata by rows: a Parquet file is compressed, its text is not.
        size, rows, row, reported = src.size, max(1, parquet.metadata.num_rows), 0, 0
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[field]):
            texts = batch.column(0).to_pylist()
            for k, text in enumerate(texts):
                if text is None:
                    raise UserError(f"input file {src.name!r} row {row + k + 1}: column {field!r} is null, not "
                                    "a string; fill or drop the rows without text")
                if text:
                    yield text
            row += len(texts)
            if on_bytes is not None:
                done = size * row // rows
                on_bytes(done - reported)
                reported = done
