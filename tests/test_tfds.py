"""TFDS records datasets: JSONL -> array_record -> the same records, with random access, no TF."""

import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from jaxtune.data import tfds as records_tfds
from jaxtune.errors import DataError

RECORDS = [
  {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
  {"instruction": "", "input": "", "output": ""},
  {
    "messages": [
      {"role": "system", "content": "You are terse."},
      {"role": "user", "content": "Ça va? 你好 👋🏽 مرحبا e\u0301"},
      {"role": "assistant", "content": 'Oui.\n\tLine two with "quotes" and \\ backslash.'},
      {"role": "user", "content": "\u0000 nul and \u2028 separator"},
      {"role": "assistant", "content": ""},
    ]
  },
  {
    "zeta": 1,
    "alpha": {"nested": {"deeper": [1, 2.5, -3e-7, 12345678901234567890, True, False, None]}},
    "empty": {"list": [], "dict": {}, "string": ""},
    "history": [["q1", "a1"], ["q2", "a2"]],
  },
  {},
]


def _write_jsonl(path: pathlib.Path, records: list[dict]) -> pathlib.Path:
  """Writes records one a line, alternating escaped and raw UTF-8, with a blank line and CRLF."""
  lines = [json.dumps(r, ensure_ascii=i % 2 == 0) for i, r in enumerate(records)]
  path.write_bytes(("\n".join(lines[:2]) + "\n\n" + "\r\n".join(lines[2:]) + "\n").encode())
  return path


def test_round_trip_keeps_every_record_in_order(tmp_path):
  jsonl = _write_jsonl(tmp_path / "mixed.jsonl", RECORDS)
  source = records_tfds.load(records_tfds.prepare(str(jsonl), str(tmp_path / "tfds")))
  expected = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
  assert expected == RECORDS
  assert len(source) == len(RECORDS)
  assert list(source) == RECORDS
  assert [list(r) for r in source] == [list(r) for r in RECORDS]  # Key order too.


def test_random_access(tmp_path):
  records = [{"id": i, "text": f"record {i} ✓"} for i in range(50)]
  jsonl = _write_jsonl(tmp_path / "many.jsonl", records)
  source = records_tfds.load(records_tfds.prepare(str(jsonl), str(tmp_path / "tfds")))
  assert len(source) == 50
  for i in np.random.default_rng(0).permutation(50):  # numpy ints, as a shuffled index gives.
    assert source[i] == records[i]
  assert source[-1] == records[-1]
  for bad in (50, -51):
    with pytest.raises(IndexError):
      source[bad]


@pytest.mark.parametrize(
  "bad_line",
  [b'{"instruction": "unterminated', b"[1, 2]", b'{"x": NaN}', b'{"x": "\xff\xfe"}'],
)
def test_invalid_line_names_file_and_line(tmp_path, bad_line):
  jsonl = tmp_path / "bad.jsonl"
  jsonl.write_bytes(b'{"a": 1}\n\n' + bad_line + b'\n{"b": 2}\n')
  with pytest.raises(DataError, match=re.escape(f"{jsonl}:3: ")):
    records_tfds.prepare(str(jsonl), str(tmp_path / "tfds"))
  assert not list((tmp_path / "tfds").rglob("*.array_record*"))


def test_empty_file_is_an_error(tmp_path):
  jsonl = tmp_path / "empty.jsonl"
  jsonl.write_text("\n \n")
  with pytest.raises(DataError, match="no records"):
    records_tfds.prepare(str(jsonl), str(tmp_path / "tfds"))


def test_prepare_twice_reuses_then_rebuilds_a_changed_file(tmp_path):
  jsonl = _write_jsonl(tmp_path / "data.jsonl", RECORDS)
  data_dir = str(tmp_path / "tfds")
  first = records_tfds.prepare(jsonl_path=str(jsonl), data_dir=data_dir, name="mine")
  info = pathlib.Path(first) / "dataset_info.json"
  written = info.stat().st_mtime_ns
  assert records_tfds.prepare(str(jsonl), data_dir, "mine") == first
  assert info.stat().st_mtime_ns == written  # Reused, not rebuilt.

  _write_jsonl(jsonl, RECORDS[:2])
  assert records_tfds.prepare(str(jsonl), data_dir, "mine") == first
  assert list(records_tfds.load(first)) == RECORDS[:2]


def test_names_keep_datasets_apart(tmp_path):
  data_dir = str(tmp_path / "tfds")
  a = records_tfds.prepare(str(_write_jsonl(tmp_path / "My Data.v2.jsonl", RECORDS)), data_dir)
  b = records_tfds.prepare(str(_write_jsonl(tmp_path / "b.jsonl", RECORDS[:1])), data_dir)
  assert pathlib.Path(a).relative_to(pathlib.Path(data_dir).resolve()).parts[0] == "my_data_v2"
  assert list(records_tfds.load(a)) == RECORDS
  assert list(records_tfds.load(b)) == RECORDS[:1]
  with pytest.raises(ValueError, match="dataset name"):
    records_tfds.prepare(str(tmp_path / "b.jsonl"), data_dir, name="../escape")


_WITHOUT_TENSORFLOW = textwrap.dedent(
  """
  import importlib.abc, importlib.machinery, json, sys

  class Broken(importlib.abc.Loader):
    def create_module(self, spec):
      return None

    def exec_module(self, module):
      raise ImportError("tensorflow is blocked in this test")

  class BlockTensorflow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
      if name == "tensorflow" or name.startswith("tensorflow."):
        return importlib.machinery.ModuleSpec(name, Broken())
      return None

  sys.meta_path.insert(0, BlockTensorflow())
  try:
    import tensorflow
  except ImportError:
    pass
  else:
    raise AssertionError("tensorflow imported")

  from jaxtune.data import tfds

  jsonl, data_dir, out = sys.argv[1:]
  source = tfds.load(tfds.prepare(jsonl, data_dir))
  records = [source[i] for i in range(len(source))]
  assert "tensorflow" not in sys.modules, "tensorflow was imported"
  with open(out, "w") as f:
    json.dump(records, f)
  """
)


def test_prepare_and_load_without_tensorflow(tmp_path):
  jsonl = _write_jsonl(tmp_path / "data.jsonl", RECORDS)
  out = tmp_path / "out.json"
  env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).parents[1])}
  result = subprocess.run(
    [sys.executable, "-c", _WITHOUT_TENSORFLOW, str(jsonl), str(tmp_path / "tfds"), str(out)],
    capture_output=True,
    text=True,
    env=env,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr
  assert json.loads(out.read_text()) == RECORDS


def test_lima_round_trip(tmp_path, data_dir):
  records = json.loads((data_dir / "lima" / "lima_train_llamafactory.json").read_text())
  jsonl = tmp_path / "lima.jsonl"
  jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
  source = records_tfds.load(records_tfds.prepare(str(jsonl), str(tmp_path / "tfds")))
  assert len(source) == len(records) == 1029
  assert list(source) == records


@pytest.mark.parametrize("where", ["features.json", "dataset_info.json"])
def test_metadata_cannot_choose_a_module_to_import(tmp_path, monkeypatch, where):
  dataset = pathlib.Path(
    records_tfds.prepare(str(_write_jsonl(tmp_path / "d.jsonl", RECORDS)), str(tmp_path / "tfds"))
  )
  marker = tmp_path / "imported"
  (tmp_path / "planted_feature.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
  monkeypatch.syspath_prepend(str(tmp_path))  # As when the command runs from that folder.
  features = json.loads((dataset / "features.json").read_text())
  features["featuresDict"]["features"]["json"]["pythonClassName"] = "planted_feature.Text"
  if where == "features.json":
    (dataset / "features.json").write_text(json.dumps(features))
  else:
    (dataset / "features.json").unlink()
    info = json.loads((dataset / "dataset_info.json").read_text())
    info["features"] = features
    (dataset / "dataset_info.json").write_text(json.dumps(info))
  with pytest.raises(DataError, match=rf"{where}: .*'planted_feature\.Text'"):
    records_tfds.load(str(dataset))
  assert not marker.exists()


def test_a_folder_that_is_not_a_dataset_is_one_error(tmp_path):
  with pytest.raises(DataError, match="not a TFDS dataset"):
    records_tfds.load(str(tmp_path))
