"""One accelerator (an NVIDIA H100 / H200, or a TPU): a ~1B Llama trained in bfloat16 at sequence
2048 with the fsdp rules, full and LoRA, and decoded with the KV cache.

Training: the step `jaxtune train` builds (`loop.build`: AdamW, float32 weights and moments,
bfloat16 compute, `mesh.strategy=fsdp` over every device, LoRA from `configs/lora.yaml`) on rows
of random tokens, every token real. Reported: tokens/s (the median of `--steps` steps after a
first one), MFU against the vendor's dense bfloat16 peak (`jaxtune.train.peak`; PaLM's 6N +
12*L*H*Q*T FLOPs per token, `train.metrics`), and memory: the device's peak bytes in use (where
the device reports it) and XLA's memory analysis of the compiled step.

Decoding (`decode.measure_batch`: jaxtune's jitted prefill and compiled decode loop): batch 64
prompts of 1024 tokens, 128 new tokens, bfloat16 weights and KV cache; tokens/s and the bytes a
step must read (weights + cache) per second, against the HBM bandwidth of the vendor's data sheet
(on a CPU: the best bandwidth `common.memory_bandwidth` measures, copy or read).

  python benchmarks/gpu.py            # ~1B model: needs an accelerator (tens of GB)
  python benchmarks/gpu.py --quick    # tiny sizes: checks the script on a CPU in a minute
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import common
import decode
import flax.linen as nn
import jax

from jaxtune import config, sharding
from jaxtune.config_model import ModelConfig
from jaxtune.model import transformer
from jaxtune.train import loop, metrics, peak

LORA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "lora.yaml")
# Llama 3.2 1B's shape (1.24B parameters, untied here), as MaxText's llama3.2-1b.
MODEL = dict(
  vocab_size=128256, dim=2048, num_layers=16, num_heads=32, num_kv_heads=8, mlp_dim=8192,
  max_seq_len=4096, rope_theta=500000.0, tie_embeddings=False,
)  # fmt: skip
QUICK_MODEL = dict(MODEL, vocab_size=512, dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   mlp_dim=128, max_seq_len=256)  # fmt: skip
TRAIN = dict(length=2048, rows=8, steps=5)
QUICK_TRAIN = dict(length=128, rows=2, steps=2)
DECODE = dict(batch=64, prompt=1024, new=128)
QUICK_DECODE = dict(batch=4, prompt=32, new=8)
# HBM bandwidth from the vendors' data sheets, bytes/s.
HBM_BANDWIDTH = {
  "NVIDIA H100 80GB HBM3": 3.35e12,
  "NVIDIA H100 PCIe": 2.0e12,
  "NVIDIA H200": 4.8e12,
  "NVIDIA H200 NVL": 4.8e12,
  "NVIDIA A100-SXM4-80GB": 2.039e12,
  "NVIDIA A100-SXM4-40GB": 1.555e12,
  "TPU v5 lite": 819e9,
  "TPU v5p": 2.765e12,
  "TPU v6 lite": 1.64e12,
}


DTYPE = "bfloat16"  # On a CPU too (--quick): XLA:CPU runs it, its products in float32.


def train(model: dict, sizes: dict, method: str, best: peak.Peak) -> dict:
  """One mode's step: tokens/s, MFU, memory."""
  overrides = [
    f"model.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in model.items()
  ]
  overrides += [
    f"model.dtype={DTYPE}",
    "model.param_dtype=float32",
    "model.remat=full",
    f"mesh.data={jax.device_count()}",
    "mesh.model=1",
    "mesh.strategy=fsdp",
    f"data.max_length={sizes['length']}",
    f"train.batch_size={sizes['rows']}",
    "train.neftune_alpha=0",
  ]
  cfg = config.load(LORA if method == "lora" else None, overrides)
  mesh = sharding.make_mesh(cfg.mesh, jax.devices())
  t = loop.build(cfg, mesh, steps=sizes["steps"] + 2)
  batch = common.train_batch(sizes["rows"], sizes["length"], cfg.model.vocab_size, t.batch_sharding)
  with sharding.use(mesh, t.rules):
    compiled = t.train_step.lower(t.state, t.frozen, batch).compile()
  state = t.state
  times = []
  for i in range(sizes["steps"] + 1):
    t0 = time.perf_counter()
    state, step_metrics = compiled(state, t.frozen, batch, t.train_step.key)
    loss = float(step_metrics["loss"])  # Waits for the step.
    if i:
      times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)
  tokens_s = sizes["rows"] * sizes["length"] / step_s
  flops = metrics.flops_per_token(cfg.model, t.n_params, sizes["length"])
  stats = jax.devices()[0].memory_stats() or {}
  return {
    "method": method,
    "params_m": t.n_params / 1e6,
    "trainable_m": t.n_trainable / 1e6,
    "step_s": step_s,
    "tokens_per_s": tokens_s,
    "mfu": tokens_s * flops / best.flops,
    "peak_device_gb": stats.get("peak_bytes_in_use", float("nan")) / 1e9,
    "xla_temp_gb": common.compiled_memory(compiled)["temp_bytes"] / 1e9,
    "loss_last": loss,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny sizes, to check it on a CPU")
  parser.add_argument("--modes", default="full,lora", help="full, lora or both (default)")
  parser.add_argument("--no-decode", action="store_true", help="training only")
  args = parser.parse_args()
  model = QUICK_MODEL if args.quick else MODEL
  sizes = QUICK_TRAIN if args.quick else TRAIN
  kind = jax.devices()[0].device_kind
  best = peak.peak(DTYPE)
  print(f"{jax.device_count()} x {kind}; MFU against the {best.describe()}", flush=True)
  rows = []
  for method in args.modes.split(","):
    rows.append(train(model, sizes, method, best))
    print(common.markdown_table(rows[-1:], list(rows[-1])).splitlines()[-1], flush=True)

  decode_rows, bandwidth = [], None
  if not args.no_decode:
    dsizes = QUICK_DECODE if args.quick else DECODE
    bandwidth = HBM_BANDWIDTH.get(kind) or common.memory_bandwidth(64)["best"]
    cfg = ModelConfig(**model, dtype=DTYPE, param_dtype=DTYPE)
    m = transformer.Transformer(cfg)
    params = nn.meta.unbox(jax.jit(transformer.init_fn(m))(jax.random.key(0)))["params"]
    decode_rows = decode.measure_batch(
      {"GQA": (m, params)}, dsizes["batch"], dsizes, runs=3, bandwidth=bandwidth
    )

  title = f"~1B Llama on one accelerator ({'quick' if args.quick else 'full'})"
  shape = ", ".join(f"{k} {v}" for k, v in model.items())
  parts = [
    f"# {title}",
    f"{jax.device_count()} x {kind}; model: {shape}; {DTYPE} compute, float32 weights and "
    f"AdamW moments, remat full, fsdp; rows of {sizes['length']} tokens, {sizes['rows']} a step. "
    f"MFU against the {best.describe()}.",
    common.markdown_table(rows, list(rows[0])),
  ]
  if decode_rows:
    parts += [
      f"Decoding ({DTYPE} weights and cache), against {bandwidth / 1e9:.1f} GB/s of memory "
      "bandwidth (the vendor's HBM figure; on a CPU the best measured copy or read):",
      common.markdown_table(
        decode_rows,
        ["batch", "decode_tokens_per_s", "ms_per_step", "read_gb_per_s", "roofline_frac",
         "prefill_tokens_per_s", "kv_cache_mb", "params_mb"],
      ),
    ]  # fmt: skip
  markdown = "\n\n".join(parts)
  results = {
    "model": model,
    "train": sizes,
    "peak_flops": best.flops,
    "peak_source": best.source,
    "hbm_bandwidth": bandwidth,
    "rows": rows,
    "decode": decode_rows,
  }
  path = common.write("gpu_quick" if args.quick else "gpu", results, markdown)
  print(markdown)
  print(f"written: {path}")


if __name__ == "__main__":
  main()
