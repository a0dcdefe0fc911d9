"""Every claim script under `benchmarks/claims/` runs in its `--quick` mode and writes a row of the
claims table with its plot, so none rots between the runs that fill the table. Each runs as a
reader runs it, `python benchmarks/claims/NAME.py --quick`, in a process of its own with one CPU
device (on the suite's 8 emulated devices a smoke run took twice as long)."""

import json
import pathlib
import shlex
import subprocess
import sys

import pytest
from subprocesses import one_device_env

CLAIMS_DIR = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "claims"
SCRIPTS = sorted(p for p in CLAIMS_DIR.glob("*.py") if p.stem != "claimlib")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_quick_mode_writes_its_row(script, tmp_path, data_dir):
  argv = ["--quick", "--out", str(tmp_path)]
  result = subprocess.run(
    [sys.executable, str(script), *argv],
    capture_output=True,
    text=True,
    timeout=600,
    cwd=tmp_path,  # Not the checkout: the script finds its own modules.
    env=one_device_env(JAXTUNE_DATA_DIR=str(data_dir)),  # Several fine-tune stories260K.
  )
  assert result.returncode == 0, result.stderr[-3000:]
  row = json.loads((tmp_path / f"claim_{script.stem}.json").read_text())
  assert row["quick"] is True
  assert row["command"] == shlex.join(["python", f"benchmarks/claims/{script.name}", *argv])
  assert row["holds"] in ("yes", "no", "partly")
  assert all(isinstance(row[k], str) and row[k] for k in ("claim", "paper", "setting", "ours"))
  assert (tmp_path / f"claim_{script.stem}.png").stat().st_size > 0
