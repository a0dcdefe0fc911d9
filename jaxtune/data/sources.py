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
from collections.abc import Sequence
from typing import Any


class DataError(ValueError):
  """A data file or record is malformed: `where` names the file and line, `reason` the field."""

  def __init__(self, where: str, reason: str):
    super().__init__(f"{where}: {reason}")
    self.where, self.reason = where, reason


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


def read_records(
  path: str, tsv_columns: Sequence[str] = (), bad: BadRecords | None = None
) -> list[Record]:
  """All records of a .json, .jsonl or .tsv file. With `bad`, malformed records are skipped and
  counted there; without, the first one raises a DataError."""
  if not os.path.isfile(path):
    raise DataError(path, "no such data file")
  with open(path, "rb") as f:
    blob = f.read().removeprefix(codecs.BOM_UTF8)
  ext = os.path.splitext(path)[1].lower()
  if ext == ".jsonl":
    return _jsonl(path, blob, bad)
  try:
    text = blob.decode("utf-8")
  except UnicodeDecodeError as e:
    line = blob[: e.start].count(b"\n") + 1
    raise DataError(f"{path}:{line}", f"invalid UTF-8 at byte {e.start}") from None
  if ext == ".json":
    return _json_array(path, text)
  if ext == ".tsv":
    return _tsv(path, text, tsv_columns, bad)
  raise DataError(path, f"unknown data file type {ext!r}; expected .json, .jsonl or .tsv")


def _json_array(path: str, text: str) -> list[Record]:
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(f"{path}:{e.lineno}", f"invalid JSON: {e.msg}") from None
  if not isinstance(data, list):
    raise DataError(path, "a .json data file must hold an array of records")
  records = []
  for i, item in enumerate(data):
    if not isinstance(item, dict):
      raise DataError(f"{path}: record {i}", f"expected an object, got {type(item).__name__}")
    records.append(Record(item, f"{path}: record {i}"))
  return records


def _jsonl(path: str, blob: bytes, bad: BadRecords | None) -> list[Record]:
  records = []
  for number, raw in enumerate(blob.split(b"\n"), 1):
    try:
      line = raw.decode("utf-8")
      if not line.strip():
        continue
      item = json.loads(line, parse_constant=_reject_constant)
      if not isinstance(item, dict):
        raise DataError(f"{path}:{number}", f"expected a JSON object, got {type(item).__name__}")
    except (UnicodeDecodeError, json.JSONDecodeError, DataError) as e:
      if isinstance(e, UnicodeDecodeError):
        e = DataError(f"{path}:{number}", f"invalid UTF-8 at byte {e.start} of the line")
      elif isinstance(e, json.JSONDecodeError):
        e = DataError(f"{path}:{number}", f"invalid JSON: {e.msg}")
      if bad is None:
        raise e from None
      bad.add(e)
      continue
    records.append(Record(item, f"{path}:{number}"))
  return records


def _reject_constant(name: str) -> None:
  raise json.JSONDecodeError(f"{name} is not valid JSON", name, 0)


def _tsv(path: str, text: str, columns: Sequence[str], bad: BadRecords | None) -> list[Record]:
  """TSV without a header (Flan's CoT files); `\\n` escapes in cells become newlines."""
  if not columns:
    raise DataError(path, "a .tsv file needs its column names (data.tsv_columns)")
  records = []
  lines = [line.removesuffix("\r") for line in text.split("\n")]  # Not splitlines: U+2028.
  rows = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
  for number, row in enumerate(rows, 1):
    if not row:
      continue
    if len(row) != len(columns):
      error = DataError(f"{path}:{number}", f"{len(row)} columns, expected {len(columns)}")
      if bad is None:
        raise error
      bad.add(error)
      continue
    cells = [cell.replace("\\n", "\n") for cell in row]
    records.append(Record(dict(zip(columns, cells, strict=True)), f"{path}:{number}"))
  return records
