"""The MFU peak: the best of every matmul at hand, and the vendor's figure for known devices."""

import dataclasses
import json
import os

import jax

from jaxtune.train import peak


def test_measured_peak_is_the_fastest_source_and_names_it():
  measured = peak.measure("float32", size=128, iters=1)
  assert {"xla", "numpy", "torch"} <= set(measured.rates)  # torch: a test dependency.
  assert measured.flops == max(measured.rates.values()) > 0
  assert measured.rates[measured.source] == measured.flops
  assert f"set by {measured.source}" in measured.describe()
  # NumPy has no bfloat16 matmul; XLA and torch do.
  assert set(peak.measure("bfloat16", size=128, iters=1).rates) == {"xla", "torch"}


@dataclasses.dataclass
class _Device:
  device_kind: str
  platform: str = "gpu"


def test_vendor_and_configured_peaks(monkeypatch):
  monkeypatch.setattr(jax, "devices", lambda: [_Device("NVIDIA H100 80GB HBM3")] * 8)
  h100 = peak.peak("bfloat16")
  assert (h100.flops, h100.source) == (8 * 989e12, "vendor:NVIDIA H100 80GB HBM3")
  assert peak.peak("float32").flops == 8 * 494.5e12  # TF32, XLA's default precision there.
  assert peak.peak("bfloat16", configured=1e12) == peak.Peak(8e12, "configured", "bfloat16", {})
  monkeypatch.setattr(jax, "devices", lambda: [_Device("TPU v5 lite", "tpu")] * 4)
  assert peak.peak("float32").flops == 4 * 197e12  # float32 matmuls run as bfloat16 passes.


def test_cpu_peak_counts_the_host_once(monkeypatch):
  # The emulated CPU devices share the host's cores: the peak is the host's, not devices x it.
  host = peak.Peak(1e11, "numpy", "float32", {"xla": 9e10, "numpy": 1e11})
  monkeypatch.setattr(peak, "cached_measure", lambda dtype: host)
  assert jax.device_count() == 8
  assert peak.peak("float32") is host


def test_measured_peak_is_cached_per_machine(monkeypatch, tmp_path):
  calls = []

  def fake_measure(dtype, size):
    calls.append((dtype, size))
    return peak.Peak(5e10, "numpy", dtype, {"xla": 4e10, "numpy": 5e10})

  monkeypatch.setattr(peak, "measure", fake_measure)
  monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # An idle machine.
  path = tmp_path / "cache" / "peak.json"
  monkeypatch.setenv("JAXTUNE_PEAK_CACHE", str(path))
  first = peak.cached_measure("float32")
  assert calls == [("float32", 2048)] and first.origin == ""
  again = peak.cached_measure("float32")
  assert calls == [("float32", 2048)], "read from the cache, not measured"
  assert (again.flops, again.source, again.rates) == (first.flops, first.source, first.rates)
  assert f"cached in {path}" in again.describe() and "measured 20" in again.origin
  (key,) = json.loads(path.read_text())
  assert key == peak.cache_key("float32", 2048) and peak.cpu_model() in key
  assert "jax " in key and "numpy " in key and "torch " in key
  peak.cached_measure("bfloat16")  # Another key: measured.
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_xnnpack=true")
  peak.cached_measure("float32")  # Other XLA flags: measured.
  assert len(calls) == 3
  path.write_text("{not json")
  assert peak.cached_measure("float32").origin == ""  # Unreadable: measured and rewritten.
  assert len(calls) == 4 and len(json.loads(path.read_text())) == 1
  monkeypatch.setenv("JAXTUNE_PEAK_CACHE", "off")
  peak.cached_measure("float32")
  assert len(calls) == 5


def test_a_peak_measured_busy_is_measured_again_when_idle(monkeypatch, tmp_path):
  """A measurement under load is too low: kept while the machine stays busy (no run measures
  again), replaced by the faster one the first idle run makes."""
  rates = iter([{"xla": 4e10, "numpy": 3e10}, {"xla": 1.5e11, "numpy": 2e11}])

  def fake_measure(dtype, size):
    r = next(rates)
    best = max(r, key=r.get)
    return peak.Peak(r[best], best, dtype, r)

  monkeypatch.setattr(peak, "measure", fake_measure)
  monkeypatch.setattr(os, "cpu_count", lambda: 2)
  monkeypatch.setenv("JAXTUNE_PEAK_CACHE", str(tmp_path / "peak.json"))
  load = [6.0]
  monkeypatch.setattr(os, "getloadavg", lambda: (load[0], 0.0, 0.0))
  busy = peak.cached_measure("float32")
  assert busy.flops == 4e10 and "load 6.0" not in busy.origin
  assert peak.cached_measure("float32").flops == 4e10, "still busy: read from the cache"
  load[0] = 0.5
  idle = peak.cached_measure("float32")
  assert (idle.flops, idle.source) == (2e11, "numpy") and idle.origin == ""
  assert "load 0.5" in peak.cached_measure("float32").origin  # Cached now, not measured again.
