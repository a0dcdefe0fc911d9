"""What every benchmark shares: the machine it ran on, the measured matmul peak, timing of a
jitted function, and the results written as JSON plus a Markdown table.

Importing it sets the host's malloc as the `jaxtune` command does (`jaxtune.host`), so jaxtune runs
here as it runs there; import it before JAX starts.

Results go to `benchmarks/results/<name>.json` and `<name>.md` (and PNG plots beside them), each
stamped with the machine, so figures from different runs are never mixed up.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune import host
from jaxtune.train import peak

host.keep_freed_memory()

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine() -> dict[str, Any]:
  """The hardware and software the figures come from."""
  return {
    "cpu": peak.cpu_model(),
    "cores": os.cpu_count(),
    "devices": [d.device_kind for d in jax.devices()],
    "backend": jax.default_backend(),
    "jax": jax.__version__,
    "python": platform.python_version(),
  }


@dataclasses.dataclass(frozen=True)
class Timing:
  """Seconds per call of a measured function: the median over `runs`, and the first call
  (compile included)."""

  median_s: float
  first_s: float
  runs: list[float]


def timed(fn: Callable[[], Any], warmup: int = 1, iters: int = 5) -> Timing:
  """Times `fn()` (which must return jax arrays or pytrees of them; each call is waited for)."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  for _ in range(warmup - 1):
    jax.block_until_ready(fn())
  runs = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    runs.append(time.perf_counter() - t0)
  return Timing(statistics.median(runs), first, runs)


def matmul_peak(size: int = 2048, dtype: str = "float32", iters: int = 5) -> peak.Peak:
  """The peak the MFU figures of a run are measured against: on a known accelerator the
  vendor's figure, else the best FLOP/s of a [size, size] matmul among XLA, NumPy's BLAS and
  torch (where installed in this environment), with the source that set it
  (`jaxtune.train.peak`). Never one framework's own matmul alone."""
  if jax.devices()[0].device_kind in peak.VENDOR_PEAKS:
    return peak.peak(dtype)
  return peak.measure(dtype, size, iters)


def memory_bandwidth(megabytes: int = 256, iters: int = 5) -> dict[str, float]:
  """The host's memory bandwidth in bytes/s, on arrays far larger than the caches, each pass its
  best of `iters`: STREAM's "copy" (a read and a write of each element, 2 x the array's bytes a
  pass) by NumPy and by XLA (a jitted x * 2, STREAM's "scale", on the default device), and a
  read alone (a sum: 1 x the bytes) by both; "best", the fastest of the four, is the roofline of
  a step bound by reading memory (a decoding step reads far more than it writes)."""
  n = megabytes * 2**20 // 4
  src, dst = np.ones(n, np.float32), np.empty(n, np.float32)
  x = jnp.ones(n, jnp.float32)
  scale, total = jax.jit(lambda x: x * 2), jax.jit(jnp.sum)
  passes = {  # name: (pass, bytes moved)
    "numpy_copy": (lambda: np.copyto(dst, src), 2 * n * 4),
    "xla_scale": (lambda: scale(x).block_until_ready(), 2 * n * 4),
    "numpy_read": (lambda: src.sum(), n * 4),
    "xla_read": (lambda: total(x).block_until_ready(), n * 4),
  }
  rates = {}
  for name, (fn, moved) in passes.items():
    fn()
    rates[name] = moved / min(timed_once(fn) for _ in range(iters))
  return {**rates, "best": max(rates.values())}


def timed_once(fn: Callable[[], Any]) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
  """Rows as a Markdown table of `columns`; floats shown with 4 significant digits."""

  def cell(value: Any) -> str:
    if isinstance(value, float):
      return f"{value:.4g}"
    return "" if value is None else str(value)

  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
  return "\n".join(lines)


def write(name: str, results: dict[str, Any], markdown: str) -> str:
  """Writes `results` (with the machine added) to results/<name>.json and the Markdown to
  results/<name>.md; returns the JSON path."""
  os.makedirs(RESULTS, exist_ok=True)
  path = os.path.join(RESULTS, f"{name}.json")
  with open(path, "w") as f:
    json.dump({"machine": machine(), **results}, f, indent=1)
  with open(os.path.join(RESULTS, f"{name}.md"), "w") as f:
    f.write(markdown.rstrip() + "\n")
  return path


def train_batch(rows: int, length: int, vocab_size: int, sharding: Any) -> dict[str, jax.Array]:
  """A batch of `jaxtune`'s train step: rows of random tokens, one sequence each, every token
  real and supervised, placed with `sharding` (a Trainer's batch_sharding)."""
  tokens = np.random.default_rng(0).integers(0, vocab_size, (rows, length + 1), np.int32)
  host = {
    "inputs": tokens[:, :-1],
    "targets": tokens[:, 1:],
    "weights": np.ones((rows, length), np.float32),
    "segment_ids": np.ones((rows, length), np.int32),
    "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)),
  }
  return {k: jax.device_put(v, sharding) for k, v in host.items()}


def compiled_memory(compiled: Any) -> dict[str, int]:
  """Bytes per device of a compiled program (XLA's memory analysis): its arguments, outputs,
  temporaries, and the outputs that reuse (donated) argument buffers."""
  stats = compiled.memory_analysis()
  return {
    "argument_bytes": stats.argument_size_in_bytes,
    "output_bytes": stats.output_size_in_bytes,
    "temp_bytes": stats.temp_size_in_bytes,
    "alias_bytes": stats.alias_size_in_bytes,
  }
