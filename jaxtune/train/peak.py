"""The peak FLOP/s that MFU divides by: the best rate the hardware shows, and who showed it.

An MFU measured against a framework's own matmul flatters that framework: on a 2-core Xeon with
AMX, XLA's 2048^2 bfloat16 matmul runs at 124 GFLOP/s where torch's runs at 631. So the peak is
the best of every source at hand, per dtype:

- known accelerators: the vendor's dense figure (below, with its source);
- CPUs (and unknown devices): the fastest measured square matmul among XLA (the device's own),
  NumPy's BLAS (float32 only: NumPy has no bfloat16 matmul) and torch, where torch is installed
  (an optional dependency; it is never imported unless it already is or can be).

`Peak.source` names the winner, and `Peak.rates` keeps every measurement, so a report can say
which one set the figure.

A CPU's measured peak is cached per machine (`cached_measure`), so that a training process does
not spend ~3 s (and torch's import) measuring it again: in `$JAXTUNE_PEAK_CACHE` (default
`$XDG_CACHE_HOME/jaxtune/peak.json`, i.e. `~/.cache/jaxtune/peak.json`; "off" measures every
time), keyed by everything the rates depend on: the CPU model, the CPUs this process may use, the
dtype and size, and the versions of jax, jaxlib, NumPy and torch. `Peak.origin` then says where
and when it was measured. Load only ever slows a measurement, and a peak kept too low puts every
later run's MFU above its truth, so an entry measured while the machine was busy (a load average
above its CPU count) is measured again by the first run that starts on an idle machine, keeping
the faster. Benchmarks measure afresh (`measure`).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

# Dense peak FLOP/s per device and dtype, from the vendors' data sheets. float32 on NVIDIA is
# TF32 on the tensor cores (what XLA's default precision runs); on TPUs float32 matmuls run as
# bfloat16 passes at the default precision, so the bfloat16 figure bounds them.
_H100 = {"bfloat16": 989e12, "float32": 494.5e12}  # H100 SXM5 data sheet (dense, no sparsity).
_A100 = {"bfloat16": 312e12, "float32": 156e12}  # A100 data sheet (dense).
VENDOR_PEAKS = {
  "TPU v4": {"bfloat16": 275e12},  # cloud.google.com/tpu/docs/v4
  "TPU v5 lite": {"bfloat16": 197e12},  # cloud.google.com/tpu/docs/v5e
  "TPU v5e": {"bfloat16": 197e12},
  "TPU v5p": {"bfloat16": 459e12},  # cloud.google.com/tpu/docs/v5p
  "TPU v6 lite": {"bfloat16": 918e12},  # cloud.google.com/tpu/docs/v6e (Trillium)
  "NVIDIA H100 80GB HBM3": _H100,
  "NVIDIA H100 PCIe": {"bfloat16": 756e12, "float32": 378e12},
  "NVIDIA H200": _H100,  # H200 data sheet: the H100's tensor cores, more and faster HBM.
  "NVIDIA H200 NVL": {"bfloat16": 835e12, "float32": 417.5e12},
  "NVIDIA A100-SXM4-80GB": _A100,
  "NVIDIA A100-SXM4-40GB": _A100,
}


@dataclasses.dataclass(frozen=True)
class Peak:
  """Peak FLOP/s of the whole host's devices of one kind (`flops`), the source that set it
  (`source`: "vendor:<device kind>", "configured", or the winning matmul "xla", "numpy",
  "torch"), each source's rate, and, for a measurement read from the cache, where and when it
  was made (`origin`)."""

  flops: float
  source: str
  dtype: str
  rates: dict[str, float]
  origin: str = ""

  def describe(self) -> str:
    others = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in self.rates.items())
    return (
      f"peak {self.flops / 1e9:.1f} GFLOP/s {self.dtype}, set by {self.source}"
      + (f" (GFLOP/s: {others})" if others else "")
      + (f"; {self.origin}" if self.origin else "")
    )


def _xla(size: int, dtype: str) -> Callable[[], object]:
  a = jnp.ones((size, size), dtype)
  matmul = jax.jit(jnp.matmul)
  return lambda: matmul(a, a).block_until_ready()


def _numpy(size: int, dtype: str) -> Callable[[], object] | None:
  if dtype != "float32":
    return None
  a = np.ones((size, size), np.float32)
  return lambda: a @ a


def _torch(size: int, dtype: str) -> Callable[[], object] | None:
  if importlib.util.find_spec("torch") is None:
    return None
  import torch  # Optional: measured only where installed.

  a = torch.ones((size, size), dtype=getattr(torch, dtype))
  return lambda: a @ a


SOURCES = {"xla": _xla, "numpy": _numpy, "torch": _torch}


@functools.cache
def measure(
  dtype: str = "float32",
  size: int = 2048,
  iters: int = 3,
  sources: tuple[str, ...] = tuple(SOURCES),
) -> Peak:
  """The best FLOP/s of a [size, size] matmul in `dtype` over `sources` (XLA on the default
  device; NumPy and torch on the host's CPUs), each its best of `iters` timed calls after one
  warm-up, the sources taking turns."""
  calls = {name: SOURCES[name](size, dtype) for name in sources}
  calls = {name: fn for name, fn in calls.items() if fn is not None}
  for fn in calls.values():
    fn()  # Warm-up (and compilation).
  seconds = {name: float("inf") for name in calls}
  # Rounds over the sources in turn: a pool still spinning after one source's call (XLA's,
  # OpenMP's) or a burst of load then costs every source alike, and each keeps its best.
  for _ in range(iters):
    for name, fn in calls.items():
      t0 = time.perf_counter()
      fn()
      seconds[name] = min(seconds[name], time.perf_counter() - t0)
  rates = {name: 2 * size**3 / s for name, s in seconds.items()}
  best = max(rates, key=rates.get)
  return Peak(rates[best], best, dtype, rates)


def cache_path() -> str | None:
  """The peak cache's file (`$JAXTUNE_PEAK_CACHE`, else under the user's cache directory);
  None when the variable is "off"."""
  path = os.environ.get("JAXTUNE_PEAK_CACHE", "")
  if path == "off":
    return None
  cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return path or os.path.join(cache_home, "jaxtune", "peak.json")


def _version(package: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return "none"


def cpu_model() -> str:
  """The CPU's model name (Linux: /proc/cpuinfo), else what `platform` says."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _cpus() -> int | None:
  """The CPUs this process may use (macOS has no affinity: all of them)."""
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count()


def cache_key(dtype: str, size: int) -> str:
  """What a measured rate depends on: the CPU, the CPUs this process may use, the matmul, and
  the libraries (and XLA's flags) that run it."""
  libraries = ", ".join(f"{p} {_version(p)}" for p in ("jax", "jaxlib", "numpy", "torch"))
  flags = os.environ.get("XLA_FLAGS", "").strip()
  key = f"{cpu_model()}; {_cpus()} CPUs; {dtype} {size}^2; {libraries}"
  return key + (f"; XLA_FLAGS {flags}" if flags else "")


def _busy(load: float) -> bool:
  return load > (os.cpu_count() or 1)


def cached_measure(dtype: str = "float32", size: int = 2048) -> Peak:
  """`measure(dtype, size)`, read from the cache when this machine has measured it (its
  `origin` says so), else measured and stored there; measured again when the entry was
  measured busy and the machine is idle now."""
  path = cache_path()
  if path is None:
    return measure(dtype, size)
  key = cache_key(dtype, size)
  entries: dict = {}
  if os.path.exists(path):
    try:
      with open(path) as f:
        entries = json.load(f)
    except (OSError, ValueError) as e:
      log.warning("peak cache %s unreadable (%s): measuring again and rewriting it", path, e)
  load = os.getloadavg()[0]
  hit = entries.get(key)
  if hit is not None and not (_busy(hit.get("load", 0.0)) and not _busy(load)):
    origin = f"measured {hit['measured']} at load {hit.get('load', 0.0):.1f}, cached in {path}"
    return Peak(hit["flops"], hit["source"], dtype, hit["rates"], origin)
  measured = measure(dtype, size)
  if hit is not None:  # Measured busy before: the faster of the two, each source its best.
    rates = {k: max(v, hit["rates"].get(k, 0.0)) for k, v in measured.rates.items()}
    best = max(rates, key=rates.get)
    measured = Peak(rates[best], best, dtype, rates)
  entries[key] = {
    "flops": measured.flops,
    "source": measured.source,
    "rates": measured.rates,
    "measured": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "load": load,
  }
  if _busy(load):
    log.warning(
      "peak measured at a load average of %.1f on %d CPUs: MFU may read high until a run on an "
      "idle machine measures it again",
      load,
      os.cpu_count() or 1,
    )
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = f"{path}.{os.getpid()}"
    with open(partial, "w") as f:
      json.dump(entries, f, indent=1)
    os.replace(partial, path)  # Whole: a process reading it never sees half a file.
  except OSError as e:
    log.warning("peak cache %s not written (%s): the next run measures again", path, e)
  return measured


def peak(dtype: str = "float32", configured: float = 0.0) -> Peak | None:
  """The peak of all of this process's devices together: `configured` (per device) when set,
  else the vendor's figure for a known accelerator times the devices, else measured. CPU
  devices (emulated ones too) share the host's cores, so a CPU's measured peak is the host's,
  counted once. None: a multi-process CPU run, which reports no MFU."""
  devices = jax.devices()
  if configured:
    return Peak(configured * len(devices), "configured", dtype, {})
  kind = devices[0].device_kind
  if kind in VENDOR_PEAKS:
    vendor = VENDOR_PEAKS[kind]
    flops = vendor.get(dtype, vendor["bfloat16"])
    return Peak(flops * len(devices), f"vendor:{kind}", dtype, {})
  if devices[0].platform == "cpu":
    if jax.process_count() > 1:
      # Measuring on one process of a multi-process CPU run (an emulated pod) stalls the
      # others' first collective past gloo's deadline; such a run's throughput says nothing of
      # a pod's, so it reports no MFU.
      return None
    return cached_measure(dtype)
  # An accelerator not in the table: its own matmul is the only rate at hand.
  measured = measure(dtype, sources=("xla",))
  return dataclasses.replace(measured, flops=measured.flops * len(devices))
