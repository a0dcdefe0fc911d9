"""BitNet b1.58 and 1-bit BitNet against dense: loss curves at equal steps and tokens, the train
step's cost of quantization-aware training, and checkpoint bytes packed at 2 bits a weight.

1. From scratch on the embedded task mixture (`configs/bitnet.yaml`: HF BitNet's layout), the same
   model with `model.linear` dense (at 3e-3, the dense default when its figures were measured),
   bitnet158 and bitnet (at the recipe's 6e-3); the same data, batches and steps for all three.
2. From scratch on a real corpus: the same three on LIMA's conversations (stories260K's 512-piece
   SentencePiece tokenizer, rows of 256), the same batches for all three.
3. QAT from the pretrained stories260K on LIMA: `configs/stories_finetune.yaml` (dense fine-tune)
   against `configs/bitnet_qat.yaml` (the same run with ternary projections).
4. The train step alone (`loop.build`'s jitted step on a fixed batch of the scratch model), dense
   against bitnet158 and bitnet, interleaved runs, median: QAT's overhead.
5. Checkpoint bytes of the scratch bitnet158 run written by `jaxtune convert` as float32,
   bfloat16 and `--pack-ternary`.

Held-out losses are the runs' own (`metrics.jsonl`), train losses every 10 steps.

  python benchmarks/bitnet.py [--steps N] [--qat-steps N]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import tempfile
import time
from typing import Any

import common
import jax

from jaxtune import config, sharding
from jaxtune.convert import export
from jaxtune.train import loop

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRATCH = {
  "dense": ["model.linear=dense", "train.learning_rate=3e-3", "train.end_learning_rate=3e-4"],
  "bitnet158": [],
  "bitnet": ["model.linear=bitnet"],
}
CORPUS = [
  "data.path=../shared/data/lima/lima_train_llamafactory.json",
  "data.template=lima",
  "data.tokenizer=../shared/data/models/stories260K/tok512.bin",
  "model.vocab_size=513",  # 512 + <EOT>.
  "data.max_length=256",
]
QAT = {"dense": "configs/stories_finetune.yaml", "bitnet158": "configs/bitnet_qat.yaml"}


def _run(files: list[str], overrides: list[str], out: pathlib.Path) -> dict[str, Any]:
  cfg = config.load([str(ROOT / f) for f in files], [*overrides, f"train.output_dir={out}"])
  t0 = time.perf_counter()
  summary = loop.run(cfg)
  records = [json.loads(line) for line in open(out / "metrics.jsonl")]
  return {
    "wall_s": time.perf_counter() - t0,
    "tokens_per_s": summary["tokens_per_s"],
    "eval_loss_start": summary["eval_loss_start"],
    "eval_loss_end": summary["eval_loss_end"],
    "train": [(r["step"], r["loss"]) for r in records if "loss" in r],
    "eval": [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r],
  }


def step_overhead(steps_files: list[str], runs: int) -> dict[str, Any]:
  """Median seconds of the jitted train step per `model.linear`, taking turns run by run."""
  steps = {}
  for name, overrides in SCRATCH.items():
    cfg = config.load(steps_files, [*overrides, "mesh.data=1", "mesh.model=1"])
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    t = loop.build(cfg, mesh, steps=10)
    batch = common.train_batch(
      cfg.train.batch_size, cfg.data.max_length, cfg.model.vocab_size, t.batch_sharding
    )
    state = t.train_step(t.state, t.frozen, batch)[0]  # Compiles.
    jax.block_until_ready(state)
    steps[name] = (t, state, batch, [])
  for _ in range(runs):
    for name, (t, state, batch, times) in steps.items():
      t0 = time.perf_counter()
      state = jax.block_until_ready(t.train_step(state, t.frozen, batch)[0])
      times.append(time.perf_counter() - t0)
      steps[name] = (t, state, batch, times)
  medians = {name: statistics.median(v[3]) for name, v in steps.items()}
  return {
    name: {"step_ms": 1e3 * s, "vs_dense": s / medians["dense"]} for name, s in medians.items()
  }


def checkpoint_bytes(run: pathlib.Path, work: pathlib.Path) -> dict[str, int]:
  out = {}
  for name, kwargs in {
    "float32": {},
    "bfloat16": {"dtype": "bfloat16"},
    "packed ternary": {"pack_ternary": True},
  }.items():
    dst = work / f"convert-{name.replace(' ', '-')}"
    export.convert(run, dst, "jaxtune", **kwargs)
    out[name] = sum(p.stat().st_size for p in (dst / "checkpoints").rglob("*") if p.is_file())
  return out


def plot(results: dict[str, Any], path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(16, 4))
  titles = {
    "scratch": "From scratch, embedded mixture",
    "corpus": "From scratch, LIMA",
    "qat": "QAT from stories260K, LIMA",
  }
  for ax, (part, title) in zip(axes, titles.items(), strict=True):
    for name, run in results[part].items():
      steps, losses = zip(*run["train"], strict=True)
      (line,) = ax.plot(steps, losses, alpha=0.6, label=f"{name} (train)")
      steps, losses = zip(*run["eval"], strict=True)
      ax.plot(steps, losses, "o--", color=line.get_color(), label=f"{name} (held out)")
    ax.set(xlabel="step", ylabel="loss", title=title, yscale="log")
    ax.grid(True, alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=200, help="steps of the scratch runs")
  parser.add_argument("--qat-steps", type=int, default=60, help="steps of the QAT runs")
  parser.add_argument("--runs", type=int, default=7, help="timed train steps per variant")
  args = parser.parse_args()
  work = pathlib.Path(tempfile.mkdtemp(prefix="bitnet-bench-"))
  bitnet_yaml = str(ROOT / "configs/bitnet.yaml")
  common_overrides = [f"train.steps={args.steps}", "train.log_every=10", "train.eval_every=50"]
  results: dict[str, Any] = {"steps": args.steps, "qat_steps": args.qat_steps}
  results["step"] = step_overhead([bitnet_yaml], args.runs)
  print(results["step"], flush=True)
  results["scratch"] = {
    name: _run(["configs/bitnet.yaml"], common_overrides + overrides, work / f"scratch-{name}")
    for name, overrides in SCRATCH.items()
  }
  results["corpus"] = {
    name: _run(["configs/bitnet.yaml"], common_overrides + CORPUS + o, work / f"corpus-{name}")
    for name, o in SCRATCH.items()
  }
  qat_overrides = [f"train.steps={args.qat_steps}", "train.log_every=5", "train.eval_every=20"]
  qat_overrides.append("train.checkpoint_every=1000")
  results["qat"] = {name: _run([f], qat_overrides, work / f"qat-{name}") for name, f in QAT.items()}
  results["checkpoint_bytes"] = checkpoint_bytes(work / "scratch-bitnet158", work)
  shutil.rmtree(work, ignore_errors=True)

  rows = []
  for part in ("scratch", "corpus", "qat"):
    for name, run in results[part].items():
      rows.append(
        {
          "part": part,
          "linear": name,
          "eval_loss_start": run["eval_loss_start"],
          "eval_loss_end": run["eval_loss_end"],
          "last_train_loss": run["train"][-1][1],
          "tokens_per_s": run["tokens_per_s"],
        }
      )
  step_rows = [{"linear": k, **v} for k, v in results["step"].items()]
  sizes = results["checkpoint_bytes"]
  size_rows = [
    {"checkpoint": k, "bytes": v, "vs_float32": v / sizes["float32"]} for k, v in sizes.items()
  ]
  markdown = "\n\n".join(
    [
      "# BitNet against dense",
      f"From scratch: `configs/bitnet.yaml` ({args.steps} steps, the same batches for each "
      f"`model.linear`), on the embedded mixture and on LIMA. QAT: stories260K on LIMA, "
      f"{args.qat_steps} steps. One CPU device; "
      "the machine was shared, so tokens/s are indicative; the step timing below takes turns.",
      common.markdown_table(
        rows,
        ["part", "linear", "eval_loss_start", "eval_loss_end", "last_train_loss", "tokens_per_s"],
      ),
      "Train step of the scratch model (batch 16 x 128, median of interleaved runs):",
      common.markdown_table(step_rows, ["linear", "step_ms", "vs_dense"]),
      "Checkpoint bytes of the scratch bitnet158 model (`jaxtune convert`, params only):",
      common.markdown_table(size_rows, ["checkpoint", "bytes", "vs_float32"]),
      "![loss curves](bitnet.png)",
    ]
  )
  path = common.write("bitnet", results, markdown)
  plot(results, os.path.join(common.RESULTS, "bitnet.png"))
  print(markdown)
  print(f"written: {path}")


if __name__ == "__main__":
  main()
