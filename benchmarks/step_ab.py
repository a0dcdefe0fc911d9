"""The training step of two jaxtune checkouts side by side, interleaved, on this machine: is a
change to the code any slower, and does it compile to the same program?

Each checkout (`--a`, `--b`: source trees, e.g. a `git worktree` of the commit before and this
one) runs in a worker process of its own (`PYTHONPATH` set to the tree) that builds the step of
`train_vs_peers.py`'s model (the objects `jaxtune train` uses, one CPU device), full and LoRA, and
reports what XLA compiled: FLOPs and bytes accessed (`cost_analysis`), temporaries
(`memory_analysis`), and a hash of the optimized HLO with its names and metadata stripped (equal
hashes: the same program). Then the workers step in turn, one step each (a, b, b, a, a, b, ...),
so that the load of a shared machine falls on both alike; both are idle while the other steps.

Reported per mode: median step time, tokens/s (batch * sequence / step) and the ratio b / a
(>= 1: b at least as fast), with the CPU seconds per step. The peak is not needed: both run the
same FLOPs (checked).

  python benchmarks/step_ab.py --a ../jaxtune-before --b . [--steps 12] [--modes full,lora]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _instruction(line: str) -> str:
  """An HLO instruction without what names it or where it came from (the source files, which
  differ between checkouts)."""
  line = re.sub(r"metadata=\{[^}]*\}|, stack_frame_id=\d+", "", line)
  return re.sub(r"%[\w.\-]+|^\s*[\w.\-]+ = ", "%x ", line)


def _worker(mode: str) -> None:
  """Builds the step, prints what XLA compiled, then steps once per line read."""
  sys.path.insert(0, HERE)
  import common  # Sets the host malloc before JAX starts.
  import jax
  import train_vs_peers as tvp

  from jaxtune import sharding
  from jaxtune.train import loop

  spec = dict(tvp.MODEL, **tvp.TRAINING, mode=mode)
  cfg = tvp.jaxtune_config(spec)
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  t = loop.build(cfg, mesh, steps=1000)
  batch = common.train_batch(spec["batch"], spec["seq"], spec["vocab"], t.batch_sharding)
  with sharding.use(mesh, t.rules):
    compiled = t.train_step.lower(t.state, t.frozen, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  hlo = "\n".join(_instruction(line) for line in compiled.as_text().splitlines() if " = " in line)
  state = t.state
  print(
    json.dumps(
      {
        "flops": cost.get("flops"),
        "bytes_accessed": cost.get("bytes accessed"),
        "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
        "hlo_sha256": hashlib.sha256(hlo.encode()).hexdigest()[:16],
        "tokens": spec["batch"] * spec["seq"],
      }
    ),
    flush=True,
  )
  for _ in sys.stdin:
    t0, c0 = time.perf_counter(), time.process_time()
    state, metrics = t.train_step(state, t.frozen, batch)
    loss = float(metrics["loss"])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(json.dumps({"wall": wall, "cpu": cpu, "loss": loss}), flush=True)


class Worker:
  def __init__(self, tree: str, mode: str):
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    self.process = subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), "--worker", mode],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      text=True,
      env=env,
      cwd=os.path.abspath(tree),
    )
    self.compiled = json.loads(self.process.stdout.readline())
    self.steps: list[dict] = []

  def step(self) -> None:
    self.process.stdin.write("\n")
    self.process.stdin.flush()
    self.steps.append(json.loads(self.process.stdout.readline()))

  def close(self) -> None:
    self.process.stdin.close()
    self.process.wait()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--a", help="the baseline source tree (required)")
  parser.add_argument("--b", default=".", help="the source tree under test (default: here)")
  parser.add_argument("--steps", type=int, default=12, help="timed steps of each (default 12)")
  parser.add_argument("--modes", default="full,lora")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    _worker(args.worker)
    return
  if not args.a:
    parser.error("--a (the baseline source tree) is required")
  import platform

  print(f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
  for mode in args.modes.split(","):
    a, b = Worker(args.a, mode), Worker(args.b, mode)
    for w in (a, b, b, a):  # Warm-up steps (the first one compiles nothing: lowered above).
      w.step()
    a.steps, b.steps = [], []
    for i in range(args.steps):
      for w in (a, b) if i % 2 == 0 else (b, a):
        w.step()
    a.close()
    b.close()
    tokens = a.compiled["tokens"]
    rows = {}
    for name, w in (("a", a), ("b", b)):
      wall = statistics.median(s["wall"] for s in w.steps)
      cpu = statistics.median(s["cpu"] for s in w.steps)
      rows[name] = dict(w.compiled, step_s=wall, cpu_s=cpu, tokens_per_s=tokens / wall)
    same = a.compiled["hlo_sha256"] == b.compiled["hlo_sha256"]
    print(f"\n{mode}: same optimized HLO: {same}")
    for name, r in rows.items():
      print(
        f"  {name}: {r['tokens_per_s']:8.0f} tokens/s  step {r['step_s'] * 1e3:7.1f} ms  "
        f"cpu {r['cpu_s'] * 1e3:7.1f} ms  flops {r['flops']:.4g}  bytes {r['bytes_accessed']:.4g}"
        f"  temp {r['temp_bytes'] / 2**20:.1f} MiB  hlo {r['hlo_sha256']}"
      )
    ratio = rows["b"]["tokens_per_s"] / rows["a"]["tokens_per_s"]
    print(
      f"  b / a tokens/s: {ratio:.3f}; losses after the steps: "
      f"{a.steps[-1]['loss']:.6f} / {b.steps[-1]['loss']:.6f}"
    )


if __name__ == "__main__":
  main()
