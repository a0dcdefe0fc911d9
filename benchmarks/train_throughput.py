"""Training throughput of jaxtune's train step: step time, real tokens/s, MFU and HFU, compile
time and memory, for full fine-tuning and LoRA, across Llama-style model sizes and the mesh
layouts of 8 emulated CPU devices (and one device, for reference).

Each configuration is built as `jaxtune train` builds it (`loop.build`: default AdamW and
NEFTune; LoRA as `configs/lora.yaml`, rank 8 on every projection). Its train step is lowered and
compiled (timed apart), then run on 8 rows of random tokens, one sequence per row, so every
token is real: a first step, then the median of `--steps` more.

- tokens_s: real tokens per second (rows x length / median step time).
- mfu, hfu: tokens/s x FLOPs per token / peak. Model FLOPs are PaLM's 6N + 12*L*H*Q*T per token
  (`metrics.flops_per_token`; N the matmul parameters; attention over the whole row, not halved
  for causality), for LoRA too: the figure of full fine-tuning at that rate. Hardware FLOPs are
  those the step executes (`metrics.hardware_flops_per_token`: remat's recomputation added, and
  under LoRA the frozen weights' gradients left out, so LoRA's hfu is below its mfu). The peak is
  `common.matmul_peak()`: the best 2048x2048 float32 matmul of XLA, NumPy and torch. The
  emulated devices share the machine's cores (XLA's CPU thread pool, which one device's matmul
  already uses whole), so that is the whole machine's peak, and MFU divides by it once, not by
  devices x peak.
- compile_s: lower + compile; first_step_s: the first run of the compiled step.
- Memory: XLA's analysis of the compiled step, MB per device (arguments: state, frozen
  parameters and batch; outputs; temporaries), and the process's peak resident memory over the
  configuration (Linux VmHWM, reset before each; the emulated devices live in this process).

    python benchmarks/train_throughput.py [--quick] [--sizes 2M,10M] [--layouts 1,2x4-fsdp]

The default run measures every layout at 2M parameters and the larger sizes on a few layouts
(`GRID`); `--sizes` and `--layouts` measure every size given on every layout given.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
from common import RESULTS, compiled_memory, markdown_table, matmul_peak, timed, train_batch, write

from jaxtune import config, sharding
from jaxtune.train import loop, metrics

LORA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "lora.yaml")
_LLAMA = [
  "model.vocab_size=4096",
  "model.tie_embeddings=false",
  "model.max_seq_len=512",
  "model.num_kv_heads=2",
]
# Llama-style (SwiGLU, RMSNorm, RoPE, untied), GQA with 2 KV heads; parameters incl. embeddings.
SIZES = {
  "2M": [*_LLAMA, "model.dim=128", "model.num_layers=4", "model.num_heads=8", "model.mlp_dim=384"],
  "10M": [
    *_LLAMA,
    "model.dim=256",
    "model.num_layers=8",
    "model.num_heads=8",
    "model.mlp_dim=1024",
  ],
  "40M": [
    *_LLAMA,
    "model.dim=512",
    "model.num_layers=12",
    "model.num_heads=8",
    "model.mlp_dim=1536",
  ],
  "quick": [
    "model.vocab_size=512",
    "model.dim=64",
    "model.num_layers=2",
    "model.num_heads=4",
    "model.mlp_dim=128",
    "model.num_kv_heads=2",
  ],
}
# data x model devices and the rule preset; "1": one device. 1x8-fsdp computes as 1x8-tp (no
# data axis to shard `embed` over) and differs only in storing the 2 KV heads' weights split.
LAYOUTS = (
  "1",
  "1x8-tp",
  "1x8-fsdp",
  "2x4-tp",
  "2x4-fsdp",
  "4x2-tp",
  "4x2-fsdp",
  "8x1-tp",
  "8x1-fsdp",
)
# The default run: every layout at 2M, the sizes on a few (a 40M step is ~1e12 FLOPs).
GRID = {"2M": LAYOUTS, "10M": ("1", "2x4-fsdp", "8x1-fsdp"), "40M": ("1", "2x4-fsdp")}
ROWS = 8
TITLES = {"full": "full fine-tuning", "lora": "LoRA (rank 8, every projection)"}
MB = 2**20
COLUMNS = (
  "size",
  "params_m",
  "layout",
  "method",
  "step_s",
  "tokens_s",
  "mfu_%",
  "hfu_%",
  "compile_s",
  "first_step_s",
  "argument_mb",
  "output_mb",
  "temp_mb",
  "peak_rss_mb",
)


def _reset_peak_rss() -> None:
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # Resets VmHWM to the current resident size.


def _peak_rss() -> int:
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def measure(size: str, layout: str, method: str, length: int, steps: int, peak: float) -> dict:
  grid, _, strategy = layout.partition("-")
  data, model = (1, 1) if grid == "1" else map(int, grid.split("x"))
  cfg = config.load(
    LORA if method == "lora" else None,
    [
      *SIZES[size],
      f"mesh.data={data}",
      f"mesh.model={model}",
      f"mesh.strategy={strategy or 'tp'}",
      f"data.max_length={length}",
      f"train.batch_size={ROWS}",
      "train.neftune_alpha=5",  # The step as its results were measured (the default is 0 now).
    ],
  )
  _reset_peak_rss()
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[: data * model])
  t = loop.build(cfg, mesh, steps=steps + 1)
  batch = train_batch(ROWS, length, cfg.model.vocab_size, t.batch_sharding)
  t0 = time.perf_counter()
  with sharding.use(mesh, t.rules):
    compiled = t.train_step.lower(t.state, t.frozen, batch).compile()
  compile_s = time.perf_counter() - t0

  state, step_metrics = t.state, {}

  def step():
    nonlocal state, step_metrics
    # Waited for by `timed`.
    state, step_metrics = compiled(state, t.frozen, batch, t.train_step.key)
    return step_metrics

  timing = timed(step, warmup=1, iters=steps)
  tokens_s = int(step_metrics["tokens"]) / timing.median_s
  frozen = t.n_params - t.n_trainable
  model_flops = metrics.flops_per_token(cfg.model, t.n_params, length)
  hardware_flops = metrics.hardware_flops_per_token(cfg.model, t.n_params, length, frozen)
  memory = compiled_memory(compiled)
  return {
    "size": size,
    "params_m": t.n_params / 1e6,
    "trainable_m": t.n_trainable / 1e6,
    "layout": layout,
    "method": method,
    "step_s": timing.median_s,
    "step_runs_s": timing.runs,
    "tokens_s": tokens_s,
    "model_flops_per_token": model_flops,
    "hardware_flops_per_token": hardware_flops,
    "mfu_%": 100 * tokens_s * model_flops / peak,
    "hfu_%": 100 * tokens_s * hardware_flops / peak,
    "compile_s": compile_s,
    "first_step_s": timing.first_s,
    **memory,
    **{k.replace("_bytes", "_mb"): v / MB for k, v in memory.items()},
    "peak_rss_mb": _peak_rss() / MB,
  }


def plot(rows: list[dict], path: str) -> None:
  """Tokens/s against model size, a line per layout; full fine-tuning and LoRA side by side."""
  import matplotlib
  import matplotlib.ticker

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  methods = sorted({r["method"] for r in rows})
  fig, axes = plt.subplots(1, len(methods), figsize=(6 * len(methods), 4.5), squeeze=False)
  for ax, method in zip(axes[0], methods, strict=True):
    for layout in dict.fromkeys(r["layout"] for r in rows):
      mine = [r for r in rows if (r["layout"], r["method"]) == (layout, method)]
      ax.plot([r["params_m"] for r in mine], [r["tokens_s"] for r in mine], "o-", label=layout)
    sizes = sorted({r["params_m"] for r in rows if r["method"] == method})
    ax.set(xscale="log", yscale="log", xlabel="parameters (M)", title=TITLES[method])
    ax.set_xticks(sizes, [f"{m:.3g}" for m in sizes], minor=False)
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.grid(True, which="both", alpha=0.3)
  axes[0][0].set_ylabel("real tokens / s")
  axes[0][-1].legend(title="layout (data x model)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="a tiny model, 2 layouts, rows of 128")
  parser.add_argument("--sizes", help=f"comma-separated, of {', '.join(SIZES)}")
  parser.add_argument("--layouts", help=f"comma-separated, of {', '.join(LAYOUTS)}")
  parser.add_argument("--steps", type=int, default=3, help="timed steps after the first")
  args = parser.parse_args()
  jax.config.update("jax_num_cpu_devices", 8)  # Before JAX initializes its backend.
  grid, length = dict(GRID), 512
  if args.quick:
    grid, length = {"quick": ("1", "2x4-fsdp")}, 128
  if args.sizes or args.layouts:  # Every size on every layout asked for.
    sizes = args.sizes.split(",") if args.sizes else list(grid)
    grid = {size: args.layouts.split(",") if args.layouts else LAYOUTS for size in sizes}
  for name, known, given in (
    ("size", SIZES, set(grid)),
    ("layout", LAYOUTS, {layout for layouts in grid.values() for layout in layouts}),
  ):
    if given - set(known):
      parser.error(
        f"unknown {name} {', '.join(sorted(given - set(known)))}; known: {', '.join(known)}"
      )

  best = matmul_peak()
  peak = best.flops
  print(f"MFU against the {best.describe()}", flush=True)
  rows = []
  for size, layouts in grid.items():
    for layout in layouts:
      for method in ("full", "lora"):
        rows.append(measure(size, layout, method, length, args.steps, peak))
        print(markdown_table(rows[-1:], COLUMNS).splitlines()[-1], flush=True)
  markdown = (
    f"Rows of {ROWS} x {length} real tokens; MFU against the {best.describe()} (the whole "
    "machine); MFU: PaLM's 6N + 12LHQT per token; HFU: FLOPs executed (LoRA: no gradients of "
    "frozen weights); memory: MB per device of the compiled step.\n\n"
    + markdown_table(rows, COLUMNS)
  )
  path = write(
    "train_throughput",
    {
      "peak_flops": peak,
      "peak_source": best.source,
      "peak_rates": best.rates,
      "length": length,
      "rows": rows,
    },
    markdown,
  )
  if len(grid) > 1:
    plot(rows, os.path.join(RESULTS, "train_throughput.png"))
  print(f"written: {path}")


if __name__ == "__main__":
  main()
