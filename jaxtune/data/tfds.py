"""Instruction records as a TensorFlow Datasets dataset, written and read without TensorFlow.

`prepare` turns a JSONL file of records (one JSON object a line, any shape: Alpaca fields,
`messages` conversations, nested metadata) into a TFDS dataset stored as array_record files, one
`train` split in file order. `load` opens it through a TFDS data source, which gives `len` and
random access, so the pipeline can shuffle by index and shard by host. This path needs neither
TensorFlow nor `importlib_resources` (see `JsonlRecords.code_path`), only TFDS and `array_record`.

Each record is stored as its compact JSON text in the one `json` feature, so any JSON object comes
back exactly as `json.loads` read it from the file, key order included.

Layout: `<data_dir>/<name>/jsonl_records/<version>/`. The SHA-256 of the source file is stored in
the dataset's `metadata.json`; preparing the same file again reuses the dataset, and preparing a
changed file under the same name deletes and rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import operator
import pathlib
import re
import shutil
from collections.abc import Iterator, Sequence
from typing import Any, SupportsIndex

import tensorflow_datasets as tfds

from jaxtune.data import sources
from jaxtune.errors import DataError

Record = dict[str, Any]

_FEATURE = "json"
_SPLIT = "train"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

log = logging.getLogger(__name__)


def _encode(record: sources.Record) -> bytes:
  try:
    return json.dumps(record.fields, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
  except UnicodeEncodeError as e:  # A lone surrogate escape such as "\ud800".
    raise DataError(record.where, f"text is not valid Unicode: {e.reason}") from e


class JsonlRecords(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """One `train` split holding the records of a JSONL file, in file order."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Records as compact JSON text in the `json` feature."}
  # TFDS looks for a download checksums file next to the builder's code. Nothing is downloaded,
  # and the lookup fails for namespace and editable-install packages, so there is no code path.
  code_path = None

  def __init__(self, *, jsonl_path: pathlib.Path, sha256: str, **kwargs: Any):
    self._jsonl_path = jsonl_path
    self._sha256 = sha256
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="Instruction records from a JSONL file, each stored as its JSON text.",
      features=tfds.features.FeaturesDict({_FEATURE: tfds.features.Text()}),
      disable_shuffling=True,  # Keys are line numbers, so the split keeps the file's order.
      metadata=tfds.core.MetadataDict(source=str(self._jsonl_path), sha256=self._sha256),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    del dl_manager  # Nothing to download.
    return {_SPLIT: self._generate_examples()}

  def _generate_examples(self) -> Iterator[tuple[int, dict[str, bytes]]]:
    records = sources.read_records(str(self._jsonl_path))
    if not records:
      raise DataError(str(self._jsonl_path), "no records")
    for key, record in enumerate(records):
      yield key, {_FEATURE: _encode(record)}


def _stored_sha256(dataset_dir: pathlib.Path) -> str | None:
  try:
    return json.loads((dataset_dir / "metadata.json").read_text()).get("sha256")
  except (OSError, ValueError):
    return None


def prepare(jsonl_path: str, data_dir: str, name: str | None = None) -> str:
  """Builds (or reuses) the TFDS dataset of a JSONL file under `data_dir`; returns its directory.

  `name` defaults to the file's stem; it names the dataset's folder in `data_dir`.
  """
  path = pathlib.Path(jsonl_path).resolve()
  if name is None:
    name = re.sub(r"[^a-z0-9]+", "_", path.stem.lower()).strip("_") or "records"
  if not _NAME_RE.fullmatch(name):
    raise ValueError(f"dataset name {name!r} must match {_NAME_RE.pattern}")
  with path.open("rb") as f:
    sha256 = hashlib.file_digest(f, "sha256").hexdigest()

  def make_builder() -> JsonlRecords:
    root = pathlib.Path(data_dir).resolve() / name
    return JsonlRecords(
      jsonl_path=path, sha256=sha256, data_dir=str(root), file_format="array_record"
    )

  builder = make_builder()
  dataset_dir = pathlib.Path(builder.data_dir)
  if dataset_dir.exists():
    if _stored_sha256(dataset_dir) == sha256:
      log.info("Reusing TFDS dataset %s of %s", dataset_dir, path)
      return str(dataset_dir)
    log.info("Rebuilding TFDS dataset %s: %s has changed", dataset_dir, path)
    shutil.rmtree(dataset_dir)
    builder = make_builder()
  builder.download_and_prepare()
  log.info(
    "Prepared TFDS dataset %s: %d records from %s",
    dataset_dir,
    builder.info.splits[_SPLIT].num_examples,
    path,
  )
  return str(dataset_dir)


class RecordSource(Sequence[Record]):
  """The records of one split: `len`, `source[i]` (random access, numpy ints too), iteration."""

  def __init__(self, source: Sequence[dict[str, bytes]]):
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: SupportsIndex) -> Record:  # type: ignore[override]
    i = operator.index(index)
    n = len(self._source)
    if not -n <= i < n:
      raise IndexError(f"record {i} out of range for {n} records")
    return json.loads(self._source[i % n][_FEATURE])


# The feature classes of `prepare`'s datasets: TFDS imports the module of any class that a
# dataset's metadata names, so a folder read as data could otherwise choose code to run.
_KNOWN_CLASSES = (
  "tensorflow_datasets.core.features.features_dict.FeaturesDict",
  "tensorflow_datasets.core.features.text_feature.Text",
)
_METADATA = ("features.json", "dataset_info.json")


def _class_names(tree: Any) -> Iterator[str]:
  """Every class that a TFDS features tree names (legacy `type` and `proto_cls` included)."""
  if isinstance(tree, dict):
    for key, value in tree.items():
      if key in ("pythonClassName", "protoCls", "proto_cls") or (
        key == "type" and "content" in tree
      ):
        yield str(value)
      else:
        yield from _class_names(value)
  elif isinstance(tree, list):
    for item in tree:
      yield from _class_names(item)


def _check_metadata(dataset_dir: pathlib.Path) -> None:
  """Refuses a folder whose metadata names a feature class other than `prepare`'s, before TFDS
  reads it."""
  if not (dataset_dir / "dataset_info.json").is_file():
    raise DataError(str(dataset_dir), "not a TFDS dataset folder (no dataset_info.json)")
  named = False
  for name in _METADATA:
    path = dataset_dir / name
    if not path.is_file():
      continue
    try:
      meta = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
      raise DataError(str(path), f"unreadable TFDS metadata: {e}") from None
    tree = (
      meta if name == "features.json" else meta.get("features") if isinstance(meta, dict) else None
    )
    for cls in _class_names(tree):
      named = True
      if cls not in _KNOWN_CLASSES:
        raise DataError(
          str(path),
          f"feature class {cls!r} is not one jaxtune reads ({', '.join(_KNOWN_CLASSES)}); "
          "refused without importing it",
        )
  if not named:
    raise DataError(
      str(dataset_dir), f"not a records dataset: no features in {' or '.join(_METADATA)}"
    )


def load(dataset_dir: str, split: str = _SPLIT) -> RecordSource:
  """Opens a dataset made by `prepare` through a TFDS array_record data source (no TensorFlow).
  Its metadata may name only the feature classes `prepare` writes (`_KNOWN_CLASSES`)."""
  _check_metadata(pathlib.Path(dataset_dir))
  try:
    builder = tfds.builder_from_directory(dataset_dir)
  except (OSError, ValueError) as e:
    raise DataError(dataset_dir, f"not a readable TFDS dataset: {str(e).splitlines()[0]}") from None
  features = list(builder.info.features.keys())
  if features != [_FEATURE]:
    raise DataError(dataset_dir, f"not a records dataset (features {features}, want [{_FEATURE}])")
  return RecordSource(builder.as_data_source(split=split))
