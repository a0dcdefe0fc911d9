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
seq, batch, mode ("full" or "lora"), dtype (of the products: "float32" or "bfloat16"),
lora_rank, lora_alpha, lora_targets (jaxtune's names: q, k, v, o, gate, up, down), lr,
weight_decay, clip_norm, steps, warmup, seed, interactive, and threads (the process keeps to
that many CPUs, see `pin`, and torch uses as many intra-op threads; default: all).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

# jaxtune's LoRA target names -> the module names of Llama in transformers and in tunix.
PROJECTIONS = {
  "q": "q_proj",
  "k": "k_proj",
  "v": "v_proj",
  "o": "o_proj",
  "gate": "gate_proj",
  "up": "up_proj",
  "down": "down_proj",
}


def config() -> dict[str, Any]:
  """The configuration given as the runner's one argument; the process is pinned to its
  `threads` CPUs."""
  if len(sys.argv) != 2:
    sys.exit(f"usage: {sys.argv[0]} '<JSON configuration>' (see benchmarks/peers/harness.py)")
  cfg = json.loads(sys.argv[1])
  cfg["threads"] = pin(cfg.get("threads"))
  return cfg


def pin(threads: int | None) -> int:
  """Keeps this process (and the threads and processes it starts later) on its first `threads`
  CPUs (None: all); returns how many it has. Call it before JAX starts: its pools follow."""
  cpus = sorted(os.sched_getaffinity(0))
  if threads:
    os.sched_setaffinity(0, cpus[:threads])
  flags = os.environ.get("XLA_FLAGS", "")
  if len(os.sched_getaffinity(0)) == 1 and "xla_cpu_multi_thread_eigen" not in flags:
    # XLA's Eigen pool is sized by all the cores: on one CPU its threads would spin.
    os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false"
  return len(os.sched_getaffinity(0))


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


@dataclasses.dataclass
class Steps:
  """Seconds of each timed step: wall clock, and this process's CPU time (all its threads: less
  disturbed than wall time by other processes on a shared machine), and the last loss."""

  wall_s: list[float] = dataclasses.field(default_factory=list)
  cpu_s: list[float] = dataclasses.field(default_factory=list)
  loss: float = float("nan")

  def run(self, step: Callable[[], float], n: int) -> Steps:
    """Times `n` calls of `step`, appended to these; returns those `n` alone."""
    new = Steps()
    for _ in range(n):
      t0, c0 = time.perf_counter(), time.process_time()
      new.loss = step()
      new.wall_s.append(time.perf_counter() - t0)
      new.cpu_s.append(time.process_time() - c0)
    self.wall_s += new.wall_s
    self.cpu_s += new.cpu_s
    self.loss = new.loss
    return new

  def summary(self, tokens: int) -> dict[str, Any]:
    """Medians, tokens per second of the median step, and every step's times."""
    median = statistics.median(self.wall_s)
    return {
      "step_s_median": median,
      "step_cpu_s_median": statistics.median(self.cpu_s),
      "tokens_per_s": tokens / median,
      "step_s": self.wall_s,
      "step_cpu_s": self.cpu_s,
    }


def serve(cfg: dict[str, Any], step: Callable[[], float], info: dict[str, Any]) -> None:
  """Times `step` as the module docstring says; `info` (framework, versions, parameter counts)
  goes into every line printed."""
  info = {**info, "threads": cfg["threads"]}
  first = Steps().run(step, 1)
  Steps().run(step, cfg.get("warmup", 1))
  timed = Steps()
  if cfg.get("interactive"):
    _emit({"event": "ready", "first_step_s": first.wall_s[0], **info})
    for line in sys.stdin:
      _emit({"event": "steps", **vars(timed.run(step, int(line)))})
  else:
    timed.run(step, cfg.get("steps", 3))
  _emit(
    {
      "event": "result",
      **info,
      "first_step_s": first.wall_s[0],
      **timed.summary(cfg["batch"] * cfg["seq"]),
      "peak_rss_mb": peak_rss_mb(),
      "loss_first": first.loss,
      "loss_last": timed.loss,
    }
  )
