"""Every claim script under `benchmarks/claims/` runs in its `--quick` mode and writes a row of the
claims table with its plot, so none rots between the runs that fill the table."""

import importlib.util
import json
import pathlib

import pytest

CLAIMS_DIR = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "claims"
SCRIPTS = sorted(p for p in CLAIMS_DIR.glob("*.py") if p.stem != "claimlib")


def _load(path: pathlib.Path):
  spec = importlib.util.spec_from_file_location(f"claim_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_quick_mode_writes_its_row(script, tmp_path, monkeypatch, data_dir):
  monkeypatch.setenv("JAXTUNE_DATA_DIR", str(data_dir))  # Several claims fine-tune stories260K.
  monkeypatch.syspath_prepend(str(CLAIMS_DIR.parent))  # benchmarks/: common.py, decode.py.
  monkeypatch.syspath_prepend(str(CLAIMS_DIR))
  _load(script).main(["--quick", "--out", str(tmp_path)])
  row = json.loads((tmp_path / f"claim_{script.stem}.json").read_text())
  assert row["quick"] is True
  assert row["holds"] in ("yes", "no", "partly")
  assert all(isinstance(row[k], str) and row[k] for k in ("claim", "paper", "setting", "ours"))
  assert (tmp_path / f"claim_{script.stem}.png").stat().st_size > 0
