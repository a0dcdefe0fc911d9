"""Reading records from disk: JSON (an array), JSONL and TSV files, each record with its location.

A record is a dict of fields. Every record carries `where` ("file:line") so that any later error
about it names the file, the line and the field.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from jaxtune.errors import DataError


@dataclasses.dataclass(frozen=True)
class Record:
  fields: dict[str, Any]
  where: str


@dataclasses.dataclass
class BadRecords:
  """Records skipped under `on_bad_record: skip`, counted by reason."""

  reasons: dict[str, int] = dataclasses.field(default_factory=dict)

  def add(self, error: DataError) -> None:
    self.reasons[error.reason] = self.reasons.get(error.reason, 0) + 1

  @property
  def count(self) -> int:
    return sum(self.reasons.values())


@dataclasses.dataclass(frozen=True)
class Source:
  """The records of a data file, by position: `len(source)` is known after a cheap scan (lines,
  or the parsed array of a .json file), and `read(positions)` parses only the records asked for,
  so a process can read just its shard of a large file."""

  path: str
  items: Sequence[Any]  # What `parse` turns into a record: a line, a row, an object.
  parse: Callable[[Any], Record]

  def __len__(self) -> int:
    return len(self.items)

  def read(self, positions: Iterable[int], bad: BadRecords | None = None) -> list[Record]:
    """The records at `positions`. With `bad`, malformed records are skipped and counted there;
    without, the first one raises a DataError."""
    records = []
    for i in positions:
      try:
        records.append(self.parse(self.items[i]))
      except DataError as e:
        if bad is None:
          raise
        bad.add(e)
    return records


def open_source(path: str, tsv_columns: Sequence[str] = ()) -> Source:
  """A .json (an array), .jsonl or .tsv file as a `Source`."""
  if not os.path.isfile(path):
    raise DataError(path, "no such data file")
  with open(path, "rb") as f:
    blob = f.read().removeprefix(codecs.BOM_UTF8)
  ext = os.path.splitext(path)[1].lower()
  if ext == ".jsonl":
    lines = [(n, raw) for n, raw in enumerate(blob.split(b"\n"), 1) if raw.strip()]
    return _nonempty(Source(path, lines, lambda line: _jsonl_record(path, *line)))
  if ext not in (".json", ".tsv"):
    raise DataError(path, f"unknown data file type {ext!r}; expected .json, .jsonl or .tsv")
  try:
    text = blob.decode("utf-8")
  except UnicodeDecodeError as e:
    line = blob[: e.start].count(b"\n") + 1
    raise DataError(f"{path}:{line}", f"invalid UTF-8 at byte {e.start}") from None
  if ext == ".json":
    items = list(enumerate(_json_array(path, text)))
    return _nonempty(Source(path, items, lambda x: _json_record(path, *x)))
  if not tsv_columns:
    raise DataError(path, "a .tsv file needs its column names (data.tsv_columns)")
  lines = [line.removesuffix("\r") for line in text.split("\n")]  # Not splitlines: U+2028.
  rows = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
  numbered = [(n, row) for n, row in enumerate(rows, 1) if row]
  return _nonempty(Source(path, numbered, lambda x: _tsv_record(path, tsv_columns, *x)))


def _nonempty(source: Source) -> Source:
  if not len(source):
    raise DataError(source.path, "no records")
  return source


def read_records(
  path: str, tsv_columns: Sequence[str] = (), bad: BadRecords | None = None
) -> list[Record]:
  """All records of a .json, .jsonl or .tsv file (see `Source.read` for `bad`)."""
  source = open_source(path, tsv_columns)
  return source.read(range(len(source)), bad)


def _json_array(path: str, text: str) -> list[Any]:
  try:
    data = json.loads(text, parse_constant=_reject_constant)
  except json.JSONDecodeError as e:
    raise DataError(f"{path}:{e.lineno}", f"invalid JSON: {e.msg}") from None
  except RecursionError:
    raise DataError(path, _TOO_DEEP) from None
  if not isinstance(data, list):
    raise DataError(path, "a .json data file must hold an array of records")
  return data


def _json_record(path: str, i: int, item: Any) -> Record:
  if not isinstance(item, dict):
    raise DataError(f"{path}: record {i}", f"expected an object, got {type(item).__name__}")
  return Record(_valid_text(item, f"{path}: record {i}"), f"{path}: record {i}")


def _jsonl_record(path: str, number: int, raw: bytes) -> Record:
  where = f"{path}:{number}"
  try:
    item = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
  except UnicodeDecodeError as e:
    raise DataError(where, f"invalid UTF-8 at byte {e.start} of the line") from None
  except json.JSONDecodeError as e:
    raise DataError(where, f"invalid JSON: {e.msg}") from None
  except RecursionError:
    raise DataError(where, _TOO_DEEP) from None
  if not isinstance(item, dict):
    raise DataError(where, f"expected a JSON object, got {type(item).__name__}")
  return Record(_valid_text(item, where), where)


_TOO_DEEP = "invalid JSON: nested too deeply"


def _valid_text(item: dict[str, Any], where: str) -> dict[str, Any]:
  """`item`, if its strings are Unicode text: JSON's escapes can spell a lone surrogate
  ("\\ud800"), which no tokenizer or file can encode."""
  try:
    json.dumps(item, ensure_ascii=False).encode("utf-8")
  except UnicodeEncodeError as e:
    raise DataError(where, f"text is not valid Unicode: {e.reason}") from None
  except RecursionError:
    raise DataError(where, _TOO_DEEP) from None
  return item


def _reject_constant(name: str) -> None:
  raise json.JSONDecodeError(f"{name} is not valid JSON", name, 0)


def _tsv_record(path: str, columns: Sequence[str], number: int, row: list[str]) -> Record:
  """A row of a TSV file without a header (Flan's CoT files); `\\n` escapes in cells become
  newlines."""
  if len(row) != len(columns):
    raise DataError(f"{path}:{number}", f"{len(row)} columns, expected {len(columns)}")
  cells = [cell.replace("\\n", "\n") for cell in row]
  return Record(dict(zip(columns, cells, strict=True)), f"{path}:{number}")
