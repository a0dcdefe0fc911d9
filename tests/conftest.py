"""Test setup: 8 emulated CPU devices (set before JAX initializes) and the shared data folder."""

import os
import pathlib

import jax
import pytest

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 8)
# The models here are tiny, so XLA's compile time dominates: compile without its backend
# optimizations, here and in the subprocesses the tests start (every comparison compiles both of
# its sides this way; the PyTorch references are unaffected).
os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "true"
jax.config.update("jax_disable_most_optimizations", True)

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
