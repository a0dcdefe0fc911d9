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
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

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
  "torch"), and each source's rate."""

  flops: float
  source: str
  dtype: str
  rates: dict[str, float]

  def describe(self) -> str:
    others = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in self.rates.items())
    return f"peak {self.flops / 1e9:.1f} GFLOP/s {self.dtype}, set by {self.source}" + (
      f" (GFLOP/s: {others})" if others else ""
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
    return measure(dtype)
  # An accelerator not in the table: its own matmul is the only rate at hand.
  measured = measure(dtype, sources=("xla",))
  return dataclasses.replace(measured, flops=measured.flops * len(devices))
