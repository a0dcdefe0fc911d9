"""jaxtune's training step side by side with its peers', on one model, on this machine, in one run.

The peers are Google's tunix (JAX, flax nnx, qwix LoRA), Google's MaxText (JAX, its
pre-training step) and PyTorch `transformers` (+ `peft`), each in its own environment made by
`benchmarks/setup_peers.sh` and driven through a runner in `benchmarks/peers/`. All train the
same Llama-style model (GQA, RoPE, SwiGLU, RMSNorm, untied output layer) with float32 weights,
AdamW and global-norm clipping on the same random batch of real tokens (no padding), by full
fine-tuning and by LoRA (same rank, alpha and projections), computing in float32 and in
bfloat16 (mixed precision: float32 weights, optimizer and softmax; jaxtune's `model.dtype`,
torch's `autocast`, MaxText's `dtype`). Not every peer runs every case (`PEERS`): MaxText's step
has no LoRA (its LoRA is tunix's PeftTrainer), and tunix's Llama has no compute dtype.

Measured: first the peak of a large matmul per dtype (`common.matmul_peak`), then, for each
mode and dtype, every framework's first step (compile included) and a warm-up step, then its
timed steps, one step of each framework in turn (jaxtune, tunix, maxtext, transformers, then
tunix, maxtext, transformers, jaxtune, ...) so that the load of a shared machine falls on all
alike. jaxtune runs in this process (one CPU device, built by `jaxtune.train.loop.build`, the
objects `jaxtune train` uses); each peer is a process of its own, idle while another steps.
`--threads N` keeps every framework to the first N CPUs (default: all).

Reported per framework, mode and dtype: median step time, tokens/s (batch * sequence / step),
the ratio jaxtune / peer of tokens/s (>= 1: jaxtune at least as fast) and of CPU time per step,
for bfloat16 the speed-up over the same framework's float32 step, first-step time, peak resident
memory (of jaxtune's run alone: the peak is reset before it), and MFU against the honest peak of
its dtype (`common.matmul_peak`: the best 2048^2 matmul of XLA, NumPy's BLAS (float32 only) and
torch, so no framework is scored against its own matmul). FLOPs per token follow PaLM
(6N + 12*L*H*Q*T, `jaxtune.train.metrics`; N the matmul parameters, counted once by jaxtune for
all); for LoRA the frozen weights get no gradients, so their 2N of weight-gradient FLOPs are left
out (4N_frozen + 6N_adapters + 12*L*H*Q*T).

  python benchmarks/train_vs_peers.py [--quick] [--steps N] [--peers tunix,maxtext,transformers]
                                      [--modes full,lora] [--dtypes float32,bfloat16]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import tempfile
from typing import Any

import common
import jax
from peers import harness

from jaxtune import config as config_lib
from jaxtune import sharding
from jaxtune.train import loop, metrics, peak

HERE = os.path.dirname(os.path.abspath(__file__))
ENVS = os.path.join(HERE, ".envs")
BOTH = ("float32", "bfloat16")
# name -> (environment's python, runner, the modes it trains, the compute dtypes it runs).
PEERS = {
  "tunix": (
    os.path.join(ENVS, "tunix", "bin", "python"),
    "tunix_step.py",
    ("full", "lora"),
    ("float32",),
  ),
  "maxtext": (os.path.join(ENVS, "maxtext", "bin", "python"), "maxtext_step.py", ("full",), BOTH),
  "transformers": (
    os.path.join(ENVS, "torch", "bin", "python"),
    "torch_step.py",
    ("full", "lora"),
    BOTH,
  ),
}
MODEL = dict(vocab=8192, dim=512, layers=8, heads=8, kv_heads=2, mlp=1408, seq=512, batch=2)
QUICK_MODEL = dict(vocab=1024, dim=128, layers=2, heads=4, kv_heads=2, mlp=352, seq=128, batch=2)
VERSION_KEYS = ("jax", "flax", "google-tunix", "qwix", "maxtext", "torch", "transformers", "peft")
TRAINING = dict(
  lora_rank=8,
  lora_alpha=16.0,
  lora_targets=["q", "k", "v", "o", "gate", "up", "down"],
  lr=1e-4,
  weight_decay=0.0,
  clip_norm=1.0,
  warmup=1,
  seed=0,
)


def jaxtune_config(spec: dict[str, Any]) -> config_lib.Config:
  """The run's configuration in jaxtune's terms."""
  overrides = [
    f"model.vocab_size={spec['vocab']}",
    f"model.dim={spec['dim']}",
    f"model.num_layers={spec['layers']}",
    f"model.num_heads={spec['heads']}",
    f"model.num_kv_heads={spec['kv_heads']}",
    f"model.mlp_dim={spec['mlp']}",
    f"model.max_seq_len={spec['seq']}",
    f"model.dtype={spec['dtype']}",
    "model.tie_embeddings=false",
    f"data.max_length={spec['seq']}",
    f"train.batch_size={spec['batch']}",
    "train.optimizer=adamw",
    f"train.learning_rate={spec['lr']}",
    "train.schedule=constant",
    "train.warmup_steps=0",
    f"train.weight_decay={spec['weight_decay']}",
    f"train.clip_norm={spec['clip_norm']}",
    "train.neftune_alpha=0",  # The peers add no embedding noise.
    f"train.seed={spec['seed']}",
  ]
  if spec["mode"] == "lora":
    overrides += [
      "peft.method=lora",
      f"peft.lora_rank={spec['lora_rank']}",
      f"peft.lora_alpha={spec['lora_alpha']}",
      f"peft.lora_targets=[{','.join(spec['lora_targets'])}]",
    ]
  return config_lib.load(None, overrides)


class Jaxtune:
  """jaxtune's step in this process, on one CPU device (all cores, like the peers)."""

  def __init__(self, spec: dict[str, Any]):
    harness.reset_peak_rss()
    cfg = jaxtune_config(spec)
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    trainer = loop.build(cfg, mesh, steps=1000)
    b, t = spec["batch"], spec["seq"]
    batch = common.train_batch(b, t, spec["vocab"], trainer.batch_sharding)
    self.state = trainer.state

    def step() -> float:
      self.state, step_metrics = trainer.train_step(self.state, trainer.frozen, batch)
      return float(step_metrics["loss"])

    self.cfg = cfg
    self.tokens = b * t
    self.first = harness.Steps().run(step, 1)
    harness.Steps().run(step, spec["warmup"])
    self._step = step
    self.timed = harness.Steps()
    self.info = {
      "framework": "jaxtune",
      "jax": jax.__version__,
      "n_params": trainer.n_params,
      "n_trainable": trainer.n_trainable,
    }

  def steps(self, n: int) -> None:
    self.timed.run(self._step, n)

  def result(self) -> dict[str, Any]:
    return {
      **self.info,
      "first_step_s": self.first.wall_s[0],
      **self.timed.summary(self.tokens),
      "peak_rss_mb": harness.peak_rss_mb(),
      "loss_first": self.first.loss,
      "loss_last": self.timed.loss,
    }


class Peer:
  """A peer's runner in its own environment, stepping when told (see `peers/harness.py`)."""

  def __init__(self, name: str, spec: dict[str, Any]):
    python, runner, _, _ = PEERS[name]
    self.name = name
    self.log = tempfile.NamedTemporaryFile("w+", prefix=f"{name}-", suffix=".log", delete=False)
    self.proc = subprocess.Popen(
      [python, os.path.join(HERE, "peers", runner), json.dumps({**spec, "interactive": True})],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      stderr=self.log,
      text=True,
    )
    self._read()  # Ready: built, and its first steps taken.

  def _read(self) -> dict[str, Any]:
    line = self.proc.stdout.readline()
    if not line:
      self.log.seek(0)
      tail = "".join(self.log.readlines()[-20:])
      raise RuntimeError(f"{self.name} runner stopped (log: {self.log.name}):\n{tail}")
    return json.loads(line)

  def steps(self, n: int) -> None:
    self.proc.stdin.write(f"{n}\n")
    self.proc.stdin.flush()
    self._read()

  def result(self) -> dict[str, Any]:
    self.proc.stdin.close()
    result = self._read()
    self.proc.wait()
    os.unlink(self.log.name)
    return {k: v for k, v in result.items() if k != "event"}


def flops_per_token(cfg: config_lib.Config, n_params: int, n_trainable: int) -> float:
  """PaLM's 6N + 12LHQT; for LoRA less the frozen weights' 2N of weight gradients."""
  flops = metrics.flops_per_token(cfg.model, n_params, cfg.data.max_length)
  if cfg.peft.method == "lora":
    flops -= 2 * (metrics.matmul_params(cfg.model, n_params) - n_trainable)
  return flops


def run_mode(spec: dict[str, Any], peers: list[str], steps: int, peak_flops: float) -> list[dict]:
  """One mode and dtype's rows: every framework's first step, then `steps` interleaved timed
  steps."""
  mode, dtype = spec["mode"], spec["dtype"]
  peers = [name for name in peers if mode in PEERS[name][2] and dtype in PEERS[name][3]]
  print(f"== {mode} {dtype}: building and compiling (jaxtune, then {', '.join(peers)})", flush=True)
  contestants = [Jaxtune(spec)] + [Peer(name, spec) for name in peers]
  for i in range(steps):
    for c in contestants[i % len(contestants) :] + contestants[: i % len(contestants)]:
      c.steps(1)  # Each round starts with the next framework: none always follows the same.
    print(f"   round {i + 1}/{steps} done", flush=True)
  results = [c.result() for c in contestants]
  cfg = contestants[0].cfg
  flops = flops_per_token(cfg, results[0]["n_params"], results[0]["n_trainable"])
  rows = [
    {"mode": mode, "dtype": dtype, **r, "mfu": flops * r["tokens_per_s"] / peak_flops}
    for r in results
  ]
  for row in rows:
    row["jaxtune_ratio"] = rows[0]["tokens_per_s"] / row["tokens_per_s"]
    row["jaxtune_cpu_ratio"] = row["step_cpu_s_median"] / rows[0]["step_cpu_s_median"]
    if row["n_params"] != rows[0]["n_params"] or row["n_trainable"] != rows[0]["n_trainable"]:
      print(
        f"   WARNING: {row['framework']} has {row['n_params']} parameters "
        f"({row['n_trainable']} trainable), jaxtune {rows[0]['n_params']} "
        f"({rows[0]['n_trainable']})"
      )
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="a tiny model, to check it works")
  parser.add_argument("--steps", type=int, help="timed steps per framework (default 3; quick 2)")
  parser.add_argument(
    "--peers",
    default=",".join(PEERS),
    help=f"which peers, comma-separated (default: all of {list(PEERS)})",
  )
  parser.add_argument("--modes", default="full,lora", help="full, lora or both (default)")
  parser.add_argument(
    "--dtypes",
    default=",".join(BOTH),
    help="compute dtypes: float32, bfloat16 or both (default)",
  )
  parser.add_argument(
    "--threads",
    type=int,
    help="CPUs (and torch threads) of every framework (default: all; 1 compares the work per "
    "core, which a loaded machine disturbs less)",
  )
  args = parser.parse_args()
  logging.basicConfig(level=logging.WARNING)
  steps = args.steps or (2 if args.quick else 3)
  threads = harness.pin(args.threads)  # Before JAX starts; the peers' processes inherit it.
  model = QUICK_MODEL if args.quick else MODEL

  peers = []
  for name in args.peers.split(",") if args.peers else []:
    if name not in PEERS:
      parser.error(f"--peers: unknown peer {name!r}; known: {list(PEERS)}")
    python = PEERS[name][0]
    if os.path.exists(python):
      peers.append(name)
    else:
      print(
        f"SKIPPED {name}: no environment at {os.path.dirname(os.path.dirname(python))}; "
        "run `bash benchmarks/setup_peers.sh` to make it"
      )
  modes, dtypes = args.modes.split(","), args.dtypes.split(",")
  if not set(modes) <= {"full", "lora"}:
    parser.error(f"--modes: choose among full, lora; got {args.modes!r}")
  if not set(dtypes) <= set(BOTH):
    parser.error(f"--dtypes: choose among {', '.join(BOTH)}; got {args.dtypes!r}")
  peaks = {dtype: common.matmul_peak(512 if args.quick else 2048, dtype) for dtype in dtypes}
  for best in peaks.values():
    print(f"MFU against the {best.describe()}", flush=True)
  rows = []
  for mode in modes:
    for dtype in dtypes:
      spec = {**model, **TRAINING, "mode": mode, "dtype": dtype, "threads": threads}
      rows += run_mode(spec, peers, steps, peaks[dtype].flops)
  speeds = {(r["mode"], r["framework"]): r["tokens_per_s"] for r in rows if r["dtype"] == BOTH[0]}
  for row in rows:
    if row["dtype"] != BOTH[0] and (row["mode"], row["framework"]) in speeds:
      row["vs_float32"] = row["tokens_per_s"] / speeds[row["mode"], row["framework"]]

  columns = [
    "mode",
    "dtype",
    "framework",
    "tokens_per_s",
    "jaxtune_ratio",
    "jaxtune_cpu_ratio",
    "vs_float32",
    "step_s_median",
    "step_cpu_s_median",
    "first_step_s",
    "peak_rss_mb",
    "mfu",
    "n_params",
    "n_trainable",
  ]
  versions: dict[str, dict[str, str]] = {}
  for r in rows:
    versions.setdefault(r["framework"], {}).update(
      (k, v) for k, v in r.items() if k in VERSION_KEYS
    )
  shape = ", ".join(f"{k} {v}" for k, v in model.items())
  markdown = "\n\n".join(
    [
      f"# Training step vs peers ({'quick' if args.quick else 'full'})",
      f"Machine: {peak.cpu_model()}, {threads} CPU(s) per framework. Model: {shape}; "
      f"float32 weights, AdamW; LoRA rank {TRAINING['lora_rank']} on "
      f"{', '.join(TRAINING['lora_targets'])}. "
      "MFU against the honest peak of each dtype (the best of XLA, NumPy and torch): "
      + "; ".join(best.describe() for best in peaks.values())
      + ".",
      "Versions: "
      + "; ".join(
        f"{name}: " + ", ".join(f"{k} {v}" for k, v in sorted(found.items()))
        for name, found in versions.items()
      ),
      common.markdown_table(rows, columns),
    ]
  )
  path = common.write(
    "train_vs_peers"
    + ("_quick" if args.quick else "")
    + (f"_{threads}cpu" if args.threads else ""),  # A run on fewer CPUs beside the full one.
    {
      "model": model,
      "training": TRAINING,
      "threads": threads,
      "peaks": {dtype: vars(best) for dtype, best in peaks.items()},
      "rows": rows,
    },
    markdown,
  )
  print(markdown)
  print(f"written: {path}")


if __name__ == "__main__":
  main()
