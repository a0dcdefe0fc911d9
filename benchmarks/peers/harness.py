"""What the peers' step runners share (standard library only: each runs in its own environment).

A runner is `python <runner>.py '<JSON configuration>'`. It builds the benchmark's model in its
framework, then hands `serve` a `step()` function (one optimizer step on its fixed random batch,
returning the loss as a float once the step has finished). `serve` times the first step (compile
or warm-up included) and then:

- by default, `warmup` more steps and `steps` timed ones, and prints one JSON result line;
- with `"interactive": true` (how `train_vs_peers.py` drives them, interleaved with the other
  frameworks), one JSON line when ready, then for every line `N` read from stdin the times of N
  steps as a JSON line, and the result line at the end of stdin.

The configuration (every runner reads the same keys): vocab, dim, layers, heads, kv_heads, mlp,
seq, batch, mode ("full" or "lora"), lora_rank, lora_alpha, lora_targets (jaxtune's names: q, k,
v, o, gate, up, down), lr, weight_decay, clip_norm, steps, warmup, seed, interactive.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any


def config() -> dict[str, Any]:
  """The configuration given as the runner's one argument."""
  if len(sys.argv) != 2:
    sys.exit(f"usage: {sys.argv[0]} '<JSON configuration>' (see benchmarks/peers/harness.py)")
  return json.loads(sys.argv[1])


def reset_peak_rss() -> None:
  """Starts the peak resident memory afresh from the current one (Linux)."""
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")


def peak_rss_mb() -> float:
  """This process's peak resident memory (Linux's VmHWM: unlike `getrusage`'s, it does not carry
  the parent's peak over a fork and exec)."""
  with open("/proc/self/status") as f:
    hwm = next(line for line in f if line.startswith("VmHWM:"))
  return int(hwm.split()[1]) / 1024


def _emit(record: dict[str, Any]) -> None:
  print(json.dumps(record), flush=True)


def _time(step: Callable[[], float], n: int) -> tuple[list[float], float]:
  times, loss = [], float("nan")
  for _ in range(n):
    t0 = time.perf_counter()
    loss = step()
    times.append(time.perf_counter() - t0)
  return times, loss


def serve(cfg: dict[str, Any], step: Callable[[], float], info: dict[str, Any]) -> None:
  """Times `step` as the module docstring says; `info` (framework, versions, parameter counts)
  goes into every line printed."""
  info = {**info, "threads": os.cpu_count()}
  (first_s,), loss_first = _time(step, 1)
  _time(step, cfg.get("warmup", 1))
  times: list[float] = []
  loss = loss_first
  if cfg.get("interactive"):
    _emit({"event": "ready", "first_step_s": first_s, **info})
    for line in sys.stdin:
      more, loss = _time(step, int(line))
      times += more
      _emit({"event": "steps", "step_s": more})
  else:
    times, loss = _time(step, cfg.get("steps", 3))
  median = statistics.median(times) if times else float("nan")
  _emit(
    {
      "event": "result",
      **info,
      "first_step_s": first_s,
      "step_s": times,
      "step_s_median": median,
      "tokens_per_s": cfg["batch"] * cfg["seq"] / median,
      "peak_rss_mb": peak_rss_mb(),
      "loss_first": loss_first,
      "loss_last": loss,
    }
  )
