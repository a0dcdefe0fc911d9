"""Test setup: 8 emulated CPU devices (set before JAX initializes), one compilation cache and one
measured peak for the whole run, and the shared data folder."""

import os
import pathlib
import tempfile

import jax
import pytest

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 8)
# The models here are tiny, so XLA's compile time dominates: compile without its backend
# optimizations, here and in the subprocesses the tests start (every comparison compiles both of
# its sides this way; the PyTorch references are unaffected).
os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "true"
jax.config.update("jax_disable_most_optimizations", True)
# Many tests compile the same programs (the tiny run's step in every `jaxtune` subprocess, the
# same model on each mesh): one persistent cache, shared by the pytest-xdist workers and the
# subprocesses through the environment, compiles each once. It is new for each run of the suite
# (keyed by xdist's run id), so a run never reuses an earlier run's programs.
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID", str(os.getpid()))
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), f"jaxtune-xla-{_RUN}")
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
# The CPU's matmul peak (for MFU) is measured once per run of the suite and shared the same way,
# never read from or written to the user's own cache (`train/peak.py`).
os.environ["JAXTUNE_PEAK_CACHE"] = os.path.join(tempfile.gettempdir(), f"jaxtune-peak-{_RUN}.json")

_DATA_DIR = pathlib.Path(
  os.environ.get("JAXTUNE_DATA_DIR", pathlib.Path(__file__).parents[1] / ".." / "shared" / "data")
).resolve()


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
  """The real third-party data; skipped when absent, except in CI where that is a failure."""
  if not _DATA_DIR.is_dir():
    message = f"shared data folder {_DATA_DIR} not found (set JAXTUNE_DATA_DIR)"
    if os.environ.get("CI") == "true":
      pytest.fail(message)
    pytest.skip(message)
  return _DATA_DIR
