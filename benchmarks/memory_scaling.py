"""Memory scaling: the bytes of parameters and optimizer state that each device holds for full
fine-tuning of published presets (AdamW, float32: parameters and two moments), on every 2D mesh
of 8 devices, with the `fsdp` rules (PaLM's layout: every weight's `embed` dimension also
sharded over `data`, every weight stored over both mesh axes) against `tp` (Megatron: weights
sharded over `model` only), against the ideal total / devices.

Nothing is allocated: `loop.build(..., shapes_only=True)` gives the state as shapes carrying the
shardings `jaxtune train` would use, and its train step is lowered and compiled for them
(full-size presets: the layers are one scanned body, so compiling a 7B model takes seconds).
XLA's memory analysis of the compiled per-device program gives the bytes of its arguments: the
state, plus the batch (known, subtracted). The sum of the state's shard shapes is shown beside
it as a check. Temporaries (activations, gradients, updates) are shown too, for a batch of
8 rows of 128 tokens.

    python benchmarks/memory_scaling.py [--quick]
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from common import compiled_memory, markdown_table, train_batch, write

from jaxtune import config, sharding
from jaxtune.train import loop

# Model presets by name. GPT-2's vocabulary (50,257 = 29 x 1,733) and 12 heads divide no mesh
# axis of 8 devices, so the rules replicate them; fsdp stores those weights split elsewhere.
MODELS = {
  name: [f"model.preset={name}"]
  for name in ("llama2-7b", "llama3-8b", "mistral-7b", "gemma-2b", "gpt2")
}
MESHES = ((1, 8), (2, 4), (4, 2), (8, 1))
STRATEGIES = ("fsdp", "tp")
ROWS, LENGTH = 8, 128
GB = 1e9
COLUMNS = (
  "model",
  "params_b",
  "mesh",
  "strategy",
  "state_gb",
  "shards_gb",
  "ideal_gb",
  "ratio",
  "temp_gb",
  "compile_s",
)


def measure(name: str, data: int, model: int, strategy: str) -> dict:
  cfg = config.load(
    None,
    [
      *MODELS[name],
      f"mesh.data={data}",
      f"mesh.model={model}",
      f"mesh.strategy={strategy}",
      f"data.max_length={LENGTH}",
      f"train.batch_size={ROWS}",
    ],
  )
  mesh = sharding.make_mesh(cfg.mesh)
  t = loop.build(cfg, mesh, steps=1, shapes_only=True)
  batch = train_batch(ROWS, LENGTH, cfg.model.vocab_size, t.batch_sharding)
  t0 = time.perf_counter()
  with sharding.use(mesh, t.rules):
    compiled = t.train_step.lower(t.state, t.frozen, batch).compile()
  compile_s = time.perf_counter() - t0
  memory = compiled_memory(compiled)
  batch_bytes = sum(x.addressable_shards[0].data.nbytes for x in batch.values())
  leaves = jax.tree.leaves(t.state)
  total = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves)
  from_shardings = sum(
    int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in leaves
  )
  state = memory["argument_bytes"] - batch_bytes
  ideal = total / jax.device_count()
  return {
    "model": name,
    "params_b": t.n_params / 1e9,
    "mesh": f"{data}x{model}",
    "strategy": strategy,
    "state_gb": state / GB,
    "shards_gb": from_shardings / GB,
    "ideal_gb": ideal / GB,
    "ratio": state / ideal,
    "temp_gb": memory["temp_bytes"] / GB,
    "compile_s": compile_s,
    **memory,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="GPT-2 on a 2x4 mesh only")
  args = parser.parse_args()
  jax.config.update("jax_num_cpu_devices", 8)  # Before JAX initializes its backend.
  models, meshes = (("gpt2",), ((2, 4),)) if args.quick else (MODELS, MESHES)
  rows = []
  for name in models:
    for data, model in meshes:
      for strategy in STRATEGIES:
        rows.append(measure(name, data, model, strategy))
        print(markdown_table(rows[-1:], COLUMNS).splitlines()[-1], flush=True)
  worst = {}
  for r in rows:
    if r["strategy"] == "fsdp" and r["ratio"] > worst.get(r["model"], {"ratio": 0})["ratio"]:
      worst[r["model"]] = r
  summary = "fsdp, per-device state / (total / devices) at worst: " + "; ".join(
    f"{name} {r['ratio']:.3f} ({r['mesh']})" for name, r in worst.items()
  )
  summary += " (target: within 10%)."
  markdown = (
    "Per-device bytes of parameters + AdamW moments (float32, full fine-tuning) on 8 devices: "
    "state_gb from the compiled train step's memory analysis (arguments less the batch), "
    "shards_gb from the arrays' shardings, ideal_gb = total / 8; temp_gb for a batch of "
    f"{ROWS}x{LENGTH} tokens.\n\n{markdown_table(rows, COLUMNS)}\n\n{summary}\n"
  )
  path = write("memory_scaling", {"rows": rows, "summary": summary}, markdown)
  print(summary, f"\nwritten: {path}")


if __name__ == "__main__":
  main()
