"""Decoding throughput with the KV cache: MHA, GQA and MQA versions of one model, batch 1 to 64.

The GQA paper (Ainslie et al. 2023) reports that multi-query and grouped-query attention decode
several times faster than multi-head attention at large batch: one decoding step reads every
weight once but the whole KV cache of every row, so at large batch and long context the cache
dominates the bytes read, and it shrinks with the number of KV heads.

One Llama-style MHA model (random weights) is converted to GQA and MQA the paper's way, by
mean-pooling K/V heads (`jaxtune.convert.uptrain.to_kv_heads`). Each version generates, greedily
and without stop ids, `new` tokens after prompts of `prompt` random tokens, at two contexts
(`CONTEXTS`: 512 prompt tokens, and the paper's 2048), on one CPU device through jaxtune's own
engine (`jaxtune.generate`: the jitted prefill, then the compiled decode loop, here called one
after the other as `generate.generate` calls them for a batch), so prefill and decode are timed
apart:

- prefill: the engine's prefill in calls of as many rows as keep a call's attention scores
  within `PREFILL_SCORES_BYTES` (64 rows of 512 tokens take 4 calls, of 2048 tokens 32),
  written into one state; timed after a first call that compiles;
- decode: the loop making the other `new - 1` tokens of every row, compiled first, then `runs`
  timed runs, each from the prefilled state (the cache arrays reused, see `rewind`); median.
  Decode tokens/s is batch * (new - 1) / decode time. The variants take turns run by run, so
  that the load of a shared machine falls on all alike (`same_tokens_every_run` in the JSON).

KV-cache bytes are those of the key and value arrays the engine allocates
(`transformer.init_cache`), checked against 2 * L * B * S * K * H * bytes per element (S: the
cache slots, prompt + new - 1). "GB/s" is what one decoding step must read at least, the
weights once plus the whole cache, over its time: near the machine's memory bandwidth when
decoding is bound by it. Each step is also set against its roofline (`roofline`): the larger of
its FLOPs at the honest matmul peak and its bytes at the measured bandwidth, which says whether
it is bound by compute or by memory and how close it comes.

With `--bitnet`, the variants are one random BitNet b1.58 model (HF BitNet's layout) computed
dense, fake-quantized (as QAT trains it) and with its weights packed at 2 bits each
(`model.linear=bitnet158_packed`), at batch 1 and 16.

With `--profile`, each variant's decode loop at batch 64 runs under `jax.profiler.trace`; the
time of each XLA op (the trace's events, named as the compiled HLO's instructions) is put in a
part of the step by the op's source (its HLO `op_name`): the weights' matmuls (q, k, v, o, MLP),
the attention over the cache (products and softmax), the cache write, the output layer, and the
rest (norms, RoPE, sampling, the loop). Shares of the ops' summed time, and ms a step.

With `--long`, only the longer prompts (with `--profile`, the profile at them).

  python benchmarks/decode.py [--quick] [--long] [--runs N] [--bitnet] [--profile]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import glob
import gzip
import json
import os
import re
import statistics
import tempfile
import time
from typing import Any

import common
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxtune import generate
from jaxtune.config_model import ModelConfig
from jaxtune.convert import ternary, uptrain
from jaxtune.model import transformer
from jaxtune.train import metrics

# dim 512 with 8 heads of 64 keeps the prefill of 64 prompts of 512 tokens within seconds on two
# cores while the MHA cache at batch 64 (1.3 GB) is 13 times the weights. A small vocabulary keeps
# the output layer from dominating a step.
MODEL = dict(vocab_size=512, dim=512, num_layers=8, num_heads=8, mlp_dim=1408, max_seq_len=2080)
QUICK_MODEL = dict(vocab_size=128, dim=64, num_layers=2, num_heads=8, mlp_dim=128, max_seq_len=96)
# (prompt and new tokens, batches): a short context, and the GQA paper's inputs of 2048 tokens,
# where the MHA cache at batch 64 (4.4 GB) is 43 times the weights. Fewer new tokens there: its
# prefill (64 x 2048 tokens a variant) is most of the run's time.
CONTEXTS = ((dict(prompt=512, new=128), (1, 16, 64)), (dict(prompt=2048, new=32), (1, 64)))
QUICK_CONTEXTS = ((dict(prompt=32, new=16), (1, 16, 64)), (dict(prompt=64, new=8), (1, 64)))
BATCH = 64  # The batch the variants are compared at.
# A prefill call takes as many rows as keep its attention scores [rows, N, T, S] within this.
PREFILL_SCORES_BYTES = 0.3e9
KV_HEADS = {"MHA": 8, "GQA": 2, "MQA": 1}
# --bitnet: HF BitNet's layout; dense, ternary fake-quantized from float weights (QAT), packed.
BITNET = dict(mlp="relu2", sub_norm=True, tie_embeddings=False)
BITNET_VARIANTS = ("dense", "bitnet158", "bitnet158_packed")
BITNET_BATCHES = (1, 16)


def variants(cfg: ModelConfig) -> dict[str, tuple[transformer.Transformer, Any]]:
  """The MHA model (random weights) and its versions with fewer KV heads, pooled from it."""
  model = transformer.Transformer(cfg)
  params = nn.meta.unbox(jax.jit(transformer.init_fn(model))(jax.random.key(0)))["params"]
  out = {}
  for name, kv_heads in KV_HEADS.items():
    pooled_cfg, pooled = uptrain.to_kv_heads(cfg, {"params": params}, kv_heads)
    out[name] = (transformer.Transformer(pooled_cfg), pooled["params"])
  return out


def bitnet_variants(cfg: ModelConfig) -> dict[str, tuple[transformer.Transformer, Any]]:
  """One random b1.58 model as dense (its latent weights as they are), as QAT computes it
  (fake-quantized at every step) and packed (`convert --pack-ternary`)."""
  qat_cfg = dataclasses.replace(cfg, linear="bitnet158")
  model = transformer.Transformer(qat_cfg)
  params = nn.meta.unbox(jax.jit(transformer.init_fn(model))(jax.random.key(0)))["params"]
  packed_cfg, packed = ternary.pack(qat_cfg, params)
  return {
    "dense": (transformer.Transformer(cfg), params),
    "bitnet158": (model, params),
    "bitnet158_packed": (transformer.Transformer(packed_cfg), jax.device_put(packed)),
  }


def kv_bytes(cache: Any) -> int:
  """Bytes of the key and value arrays of a cache."""
  return sum(x.nbytes for x in jax.tree.leaves((cache["key"], cache["value"])))


def copy(state: Any) -> Any:
  return jax.tree.map(jnp.copy, state)


@functools.partial(jax.jit, donate_argnums=0)
def _place(full: Any, part: Any, start: jax.Array) -> Any:
  """`part` (a prefilled state of some rows) written into `full` (the whole batch's) at row
  `start`, in place; scalars (the cache index, the step) are every part's alike."""
  return jax.tree.map(
    lambda f, p: jax.lax.dynamic_update_slice_in_dim(f, p, start, 0) if f.ndim else p, full, part
  )


@dataclasses.dataclass
class Prefilled:
  run: generate._Run  # Decodes the whole batch (`advance`); its state is the prefilled one.
  start: Any  # A copy of the prefilled state without the cache's keys and values.
  first_s: float  # The first prefill call's seconds (it compiles).
  prefill_s: float  # Seconds of the prefill of every row, compiled.
  rows_per_call: int


def prefill(model, params, prompts: list[list[int]], sizes: dict) -> Prefilled:
  """The engine's prefill of `prompts`, in calls of as many rows (a power of 2) as keep a
  call's attention scores [rows, N, T, S] (float32) within `PREFILL_SCORES_BYTES`, written into
  one state for the whole batch: the first call compiles, and a small one keeps that short.
  (The engine prefills a batch in one call, its attention in blocks of queries, so that its
  scores stay within [B, N, 256, S] a layer.)"""
  cfg, batch, t = model.config, len(prompts), sizes["prompt"]
  sampling = generate.Sampling(max_new_tokens=sizes["new"])
  rows = batch
  while rows > 1 and rows * cfg.num_heads * t * (t + sizes["new"] - 1) * 4 > PREFILL_SCORES_BYTES:
    rows //= 2

  def call(i):
    part = prompts[i : i + rows]
    return generate._Run(
      model, params, part, range(i, i + rows), sampling, (), 0, None, (), images=None
    )

  def empty(part):
    def zeros(x):
      return jnp.zeros((batch, *x.shape[1:]), x.dtype) if x.ndim else jnp.copy(x)

    return jax.tree.map(zeros, part)

  t0 = time.perf_counter()
  run = call(0)  # Compiles; and `_place`, on a whole batch's state dropped at once.
  if rows < batch:
    jax.block_until_ready(_place(empty(run.state), run.state, 0))
  jax.block_until_ready(run.state)
  t1 = time.perf_counter()
  state = None
  for i in range(0, batch, rows):
    part = call(i)
    if rows == batch:
      state = part.state
    else:
      state = _place(empty(part.state) if state is None else state, part.state, i)
  jax.block_until_ready(state)
  t2 = time.perf_counter()
  run.state, run.count = state, batch
  start = copy(state.replace(cache=dict(state.cache, key=None, value=None)))
  return Prefilled(run, start, t1 - t0, t2 - t1, rows)


def rewind(prefilled: Prefilled) -> None:
  """Puts the run back at its prefilled state, reusing the cache arrays of its last run (no
  second copy of a cache that can take 4 GB): the slots past the prompts keep that run's keys
  and values, masked until each step writes its own slot, so the tokens are the same."""
  run, start = prefilled.run, copy(prefilled.start)  # The decode loop takes (donated) all of it.
  cache = dict(start.cache, key=run.state.cache["key"], value=run.state.cache["value"])
  run.state = start.replace(cache=cache)


def roofline(rows: list[dict[str, Any]], models: dict, peak: float, bandwidth: float) -> None:
  """Adds each row's roofline: a decoding step takes at least its FLOPs at the `peak` (FLOP/s)
  and at least its bytes at the `bandwidth` (bytes/s); `roofline_ms` is the larger, `bound` says
  which, `of_roofline` is roofline_ms over the measured step. FLOPs of a step: a forward pass
  per row (`metrics.forward_flops_per_token`) attending to every cache slot, as the step
  computes them, masked or not. Bytes: the weights once and the whole cache (`read_mb`)."""
  for row in rows:
    model, params = models[row["variant"]]
    total = sum(x.size for x in jax.tree.leaves(params))
    flops = row["batch"] * metrics.forward_flops_per_token(model.config, total, row["cache_slots"])
    compute_ms = 1e3 * flops / peak
    memory_ms = 1e3 * row["read_mb"] * 1e6 / bandwidth
    row["gflop_per_step"] = flops / 1e9
    row["gflop_per_s"] = flops / 1e9 / (row["ms_per_step"] / 1e3)
    row["roofline_ms"] = max(compute_ms, memory_ms)
    row["bound"] = "compute" if compute_ms > memory_ms else "memory"
    row["of_roofline"] = row["roofline_ms"] / row["ms_per_step"]


def measure_batch(
  models: dict, batch: int, sizes: dict, runs: int, bandwidth: float
) -> list[dict[str, Any]]:
  """Prefill and decode timings of every variant at one batch size; `bandwidth`: the host's
  measured memory bandwidth (bytes/s), which the decode read rates are divided by."""
  rng = np.random.default_rng([batch, sizes["prompt"]])
  prompts = rng.integers(1, 100, (batch, sizes["prompt"])).tolist()
  engines, rows = {}, {}
  for name, (model, params) in models.items():
    done = prefill(model, params, prompts, sizes)
    cfg, run = model.config, done.run
    slots = run.plan.cache_len
    elements = 2 * cfg.num_layers * batch * slots * cfg.kv_heads * cfg.head_size
    rows[name] = {
      "batch": batch,
      "prompt": sizes["prompt"],
      "new": sizes["new"],
      "variant": name,
      "kv_heads": cfg.kv_heads,
      "kv_cache_mb": kv_bytes(run.state.cache) / 1e6,
      "kv_formula_mb": elements * jnp.dtype(cfg.dtype).itemsize / 1e6,
      "cache_slots": slots,
      "params_mb": sum(x.nbytes for x in jax.tree.leaves(params)) / 1e6,
      "prefill_first_s": done.first_s,
      "prefill_s": done.prefill_s,
      "prefill_rows_per_call": done.rows_per_call,
      "decode_runs_s": [],
    }
    run.advance(2)  # Compiles the decode loop (the limit is an argument, not a shape).
    engines[name] = done
  tokens = {}
  for _ in range(runs):
    for name, done in engines.items():
      rewind(done)
      jax.block_until_ready(done.run.state)
      t0 = time.perf_counter()
      tokens_bn = done.run.advance(sizes["new"])
      rows[name]["decode_runs_s"].append(time.perf_counter() - t0)
      assert tokens_bn.shape == (batch, sizes["new"]), tokens_bn.shape
      same = np.array_equal(tokens.setdefault(name, tokens_bn), tokens_bn)
      rows[name]["same_tokens_every_run"] = rows[name].get("same_tokens_every_run", True) and same
  del engines  # The caches: up to 4.4 GB (MHA, batch 64, 2079 slots).
  for row in rows.values():
    steps = sizes["new"] - 1
    row["decode_s"] = statistics.median(row["decode_runs_s"])
    row["ms_per_step"] = 1e3 * row["decode_s"] / steps
    row["decode_tokens_per_s"] = batch * steps / row["decode_s"]
    baseline = rows[next(iter(rows))]  # MHA, or dense.
    row["speedup_vs_mha"] = row["decode_tokens_per_s"] / baseline["decode_tokens_per_s"]
    row["read_mb"] = row["params_mb"] + row["kv_cache_mb"]
    row["read_gb_per_s"] = row["read_mb"] / 1e3 / (row["ms_per_step"] / 1e3)
    row["roofline_frac"] = row["read_gb_per_s"] * 1e9 / bandwidth
    row["prefill_tokens_per_s"] = batch * sizes["prompt"] / row["prefill_s"]
    print(
      f"prompt {sizes['prompt']} batch {batch:3d} {row['variant']}: "
      f"{row['decode_tokens_per_s']:9.1f} tokens/s "
      f"({row['ms_per_step']:.1f} ms/step, x{row['speedup_vs_mha']:.2f} MHA), "
      f"reads {row['read_gb_per_s']:.1f} GB/s ({100 * row['roofline_frac']:.0f}% of the "
      f"bandwidth), prefill {row['prefill_tokens_per_s']:.0f} tokens/s, "
      f"KV cache {row['kv_cache_mb']:.1f} MB, same tokens every run: "
      f"{row['same_tokens_every_run']}",
      flush=True,
    )
  return list(rows.values())


# Where each XLA op of a decoding step comes from, by its HLO op_name: first match wins.
PARTS = {
  "weights' matmuls": re.compile(r"/(attn/[qkvo]|mlp)/"),
  "cache write": re.compile(r"/attn/dynamic_update_slice"),
  "attention over the cache": re.compile(r"/attn/"),
  "output layer": re.compile(r"Transformer\.logits|/embed/.*dot_general"),
}
OTHER = "other (norms, RoPE, sampling, loop)"


def op_parts(hlo_text: str) -> dict[str, str]:
  """Instruction name -> part of the step (`PARTS`), from a compiled module's text. An op that
  lost its op_name (XLA:CPU drops it from MHA's attention products) and reads a cache buffer
  (an operand written by a dynamic-update-slice) is the attention's."""
  parts = {}
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%(\S+) = \S+ [\w-]+\(([^)]*)\)(.*)", line)
    if not m:
      continue
    name, operands, rest = m.groups()
    op = re.search(r'op_name="([^"]+)"', rest)
    if op:
      parts[name] = next((part for part, rx in PARTS.items() if rx.search(op[1])), OTHER)
    else:
      parts[name] = "attention over the cache" if "dynamic-update-slice" in operands else OTHER
  return parts


def profile_batch(models: dict, batch: int, sizes: dict) -> list[dict[str, Any]]:
  """Each variant's decode loop under the profiler: ms a step in each part (`PARTS`)."""
  rng = np.random.default_rng([batch, sizes["prompt"]])
  prompts = rng.integers(1, 100, (batch, sizes["prompt"])).tolist()
  rows = []
  for name, (model, params) in models.items():
    done = prefill(model, params, prompts, sizes)
    run = done.run
    hlo = run.decode.lower(params, run.state, np.int32(2)).compile().as_text()
    run.advance(2)  # Compiles.
    parts = op_parts(hlo)
    rewind(done)
    jax.block_until_ready(run.state)
    folder = tempfile.mkdtemp()
    t0 = time.perf_counter()
    with jax.profiler.trace(folder, create_perfetto_trace=True):
      run.advance(sizes["new"])
    wall = time.perf_counter() - t0
    (path,) = glob.glob(f"{folder}/**/*.trace.json.gz", recursive=True)
    with gzip.open(path) as f:
      events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    spent = collections.Counter()
    for e in events:
      if e.get("ph") == "X" and e.get("name") in parts:
        spent[parts[e["name"]]] += e["dur"] / 1e3  # ms
    steps = sizes["new"] - 1
    row = {"batch": batch, "variant": name, "ms_per_step_traced": 1e3 * wall / steps}
    total = sum(spent.values())
    for part in [*PARTS, OTHER]:
      row[f"{part} ms"] = spent[part] / steps
      row[f"{part} %"] = 100 * spent[part] / total
    print(row, flush=True)
    rows.append(row)
  return rows


def plot(rows: list[dict[str, Any]], path: str, title: str, bandwidth: float | None = None) -> None:
  """Decode tokens/s against batch, and (with `bandwidth`) the bytes each step must read per
  second against the measured memory bandwidth, and the share of its roofline each step reaches
  (`roofline`: 1 is the larger of its FLOPs at the peak and its bytes at the bandwidth; hollow
  markers: bound by compute). One line a variant and prompt length (dashed: the longer
  prompts)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  batches = sorted({r["batch"] for r in rows})
  prompts = sorted({r.get("prompt", 0) for r in rows})
  names = list(dict.fromkeys(r["variant"] for r in rows))
  colors = {name: f"C{i}" for i, name in enumerate(names)}
  panels = 3 if bandwidth else 1
  fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.5), squeeze=False)
  for name, prompt in dict.fromkeys((r["variant"], r.get("prompt", 0)) for r in rows):
    mine = [r for r in rows if r["variant"] == name and r.get("prompt", 0) == prompt]
    style = dict(marker="o", ls="--" if prompt != prompts[0] else "-", color=colors[name])
    label = f"{name} (KV heads: {mine[0].get('kv_heads', '-')})"
    label += (
      f", prompt {prompt}" if len(prompts) > 1 else f", weights {mine[0]['params_mb']:.1f} MB"
    )
    x = [r["batch"] for r in mine]
    axes[0, 0].plot(x, [r["decode_tokens_per_s"] for r in mine], label=label, **style)
    if bandwidth:
      axes[0, 1].plot(x, [r["read_gb_per_s"] for r in mine], label=label, **style)
      axes[0, 2].plot(x, [r["of_roofline"] for r in mine], label=label, **style)
      compute = [r for r in mine if r["bound"] == "compute"]
      axes[0, 2].scatter(
        [r["batch"] for r in compute],
        [r["of_roofline"] for r in compute],
        s=70,
        facecolors="white",
        edgecolors=colors[name],
        zorder=3,
      )
  axes[0, 0].set(ylabel="decode tokens/s", title=title)
  if bandwidth:
    axes[0, 1].axhline(bandwidth / 1e9, color="k", ls=":", label="measured bandwidth")
    axes[0, 1].set(ylabel="GB/s read (weights + KV cache per step)", title="Memory roofline")
    axes[0, 2].set(
      ylabel="roofline time / step time",
      title="Share of the roofline (hollow: compute-bound)",
      ylim=(0, 1.05),
    )
  for i, ax in enumerate(axes[0]):
    ax.set(xscale="log", yscale="log" if i < 2 else "linear", xlabel="batch")
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="a tiny model, to check it works")
  parser.add_argument("--runs", type=int, default=3, help="timed decode runs per variant")
  parser.add_argument(
    "--bitnet", action="store_true", help="dense against BitNet b1.58 (QAT and packed weights)"
  )
  parser.add_argument(
    "--profile", action="store_true", help="where a decoding step's time goes, at batch 64"
  )
  parser.add_argument("--long", action="store_true", help="only the longer prompts")
  args = parser.parse_args()
  if args.bitnet:
    return main_bitnet(args)
  if args.profile:
    return main_profile(args)
  model = QUICK_MODEL if args.quick else MODEL
  contexts = (QUICK_CONTEXTS if args.quick else CONTEXTS)[1 if args.long else 0 :]
  cfg = ModelConfig(**model)
  cfg.validate()
  models = variants(cfg)
  bandwidth = common.memory_bandwidth(64 if args.quick else 256)
  rates = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in bandwidth.items())
  print(f"memory bandwidth (GB/s): {rates}", flush=True)
  peak = common.matmul_peak(512 if args.quick else 2048)
  print(f"peak: {peak.describe()}", flush=True)
  rows = []
  for sizes, batches in contexts:
    for batch in batches:
      rows += measure_batch(models, batch, sizes, args.runs, bandwidth["best"])
  roofline(rows, models, peak.flops, bandwidth["best"])

  name = "decode" + ("_long" if args.long else "") + ("_quick" if args.quick else "")
  summary, latency = [], []
  for sizes, _ in contexts:
    mine = [r for r in rows if r["prompt"] == sizes["prompt"]]
    at = {r["variant"]: r for r in mine if r["batch"] == BATCH}
    summary.append(
      f"prompts of {sizes['prompt']}: "
      + ", ".join(
        f"{v} x{at[v]['speedup_vs_mha']:.2f} (the roofline allows "
        f"x{at['MHA']['roofline_ms'] / at[v]['roofline_ms']:.2f})"
        for v in ("GQA", "MQA")
      )
    )
    latency.append(
      f"prompts of {sizes['prompt']}: "
      + ", ".join(f"{r['variant']} {r['ms_per_step']:.1f} ms" for r in mine if r["batch"] == 1)
    )
  columns = [
    "prompt",
    "new",
    "batch",
    "variant",
    "kv_heads",
    "decode_tokens_per_s",
    "speedup_vs_mha",
    "ms_per_step",
    "read_gb_per_s",
    "roofline_frac",
    "gflop_per_s",
    "bound",
    "roofline_ms",
    "of_roofline",
    "prefill_s",
    "prefill_tokens_per_s",
    "kv_cache_mb",
    "kv_formula_mb",
  ]
  shape = ", ".join(f"{k} {v}" for k, v in model.items())
  title = f"Decoding with the KV cache ({'quick' if args.quick else 'full'})"
  contexts_text = "; ".join(
    f"prompts of {c['prompt']} tokens, {c['new']} new tokens, batch {', '.join(map(str, b))}"
    for c, b in contexts
  )
  markdown = "\n\n".join(
    [
      f"# {title}",
      f"Model: {shape}; float32; {KV_HEADS['GQA']} KV heads for GQA, pooled from MHA. "
      f"{contexts_text} (greedy); {args.runs} decode runs, median. One CPU device.",
      f"Decode tokens/s against MHA at batch {BATCH}: {'; '.join(summary)}. Batch-1 latency per "
      f"token: {'; '.join(latency)}. Memory bandwidth measured in this run (GB/s; STREAM copy "
      f"by NumPy {bandwidth['numpy_copy'] / 1e9:.1f} and XLA {bandwidth['xla_scale'] / 1e9:.1f}, "
      f"a read alone by NumPy {bandwidth['numpy_read'] / 1e9:.1f} and XLA "
      f"{bandwidth['xla_read'] / 1e9:.1f}): the best, {bandwidth['best'] / 1e9:.1f} GB/s; "
      "read_gb_per_s is what a decoding step must read (the weights once and the whole KV "
      f"cache) over its time, roofline_frac that over the bandwidth. Peak: {peak.describe()}; "
      "gflop_per_s is a step's FLOPs (forward: 2 per matmul weight a row, 4 * layers * heads * "
      "head size per cache slot) over its time. roofline_ms: the larger of the FLOPs at the peak "
      "and the bytes at the bandwidth (bound: which); of_roofline: that over ms_per_step.",
      common.markdown_table(rows, columns),
      f"![decode tokens/s]({name}.png)",
    ]
  )
  results = {
    "model": model,
    "contexts": [dict(c, batches=list(b)) for c, b in contexts],
    "kv_heads": KV_HEADS,
    "memory_bandwidth": bandwidth,
    "peak": dataclasses.asdict(peak),
    "rows": rows,
  }
  path = common.write(name, results, markdown)
  plot(rows, os.path.join(common.RESULTS, f"{name}.png"), title, bandwidth["best"])
  print(markdown)
  print(f"written: {path}")


def main_profile(args: argparse.Namespace) -> None:
  model = QUICK_MODEL if args.quick else MODEL
  sizes = (QUICK_CONTEXTS if args.quick else CONTEXTS)[1 if args.long else 0][0]
  sizes = dict(sizes, new=min(sizes["new"], 32))
  cfg = ModelConfig(**model)
  cfg.validate()
  rows = profile_batch(variants(cfg), BATCH, sizes)
  name = "decode_profile" + ("_long" if args.long else "") + ("_quick" if args.quick else "")
  parts = [*PARTS, OTHER]
  columns = ["batch", "variant", "ms_per_step_traced", *(f"{p} ms" for p in parts)]
  shares = ["variant", *(f"{p} %" for p in parts)]
  shape = ", ".join(f"{k} {v}" for k, v in model.items())
  markdown = "\n\n".join(
    [
      "# Where a decoding step's time goes",
      f"Model: {shape}; float32. Prompts of {sizes['prompt']} tokens, {sizes['new']} new tokens, "
      f"batch {BATCH}; one decode loop a variant under `jax.profiler.trace`. Each XLA op's "
      "time is put in a part of the step by its HLO op_name; ms a step, then shares of the ops' "
      "summed time.",
      common.markdown_table(rows, columns),
      common.markdown_table(rows, shares),
    ]
  )
  path = common.write(name, {"model": model, "sizes": sizes, "rows": rows}, markdown)
  print(markdown)
  print(f"written: {path}")


def main_bitnet(args: argparse.Namespace) -> None:
  model = dict(QUICK_MODEL if args.quick else MODEL, **BITNET)
  sizes = QUICK_CONTEXTS[0][0] if args.quick else dict(prompt=128, new=64)
  cfg = ModelConfig(**model)
  cfg.validate()
  models = bitnet_variants(cfg)
  bandwidth = common.memory_bandwidth(64 if args.quick else 256)
  rows = []
  for batch in BITNET_BATCHES:
    rows += measure_batch(models, batch, sizes, args.runs, bandwidth["best"])
  name = "decode_bitnet_quick" if args.quick else "decode_bitnet"
  for row in rows:
    row["vs_dense"] = row.pop("speedup_vs_mha")
  columns = [
    "batch",
    "variant",
    "decode_tokens_per_s",
    "vs_dense",
    "ms_per_step",
    "params_mb",
    "read_gb_per_s",
    "prefill_s",
    "kv_cache_mb",
  ]
  shape = ", ".join(f"{k} {v}" for k, v in model.items())
  title = f"Decoding BitNet b1.58 on XLA:CPU ({'quick' if args.quick else 'full'})"
  markdown = "\n\n".join(
    [
      f"# {title}",
      f"Model: {shape}; float32 compute; the same random b1.58 weights as dense (the latent "
      "weights as they are), as QAT computes them (fake-quantized at every step) and packed at 2 "
      f"bits a weight. Prompts of {sizes['prompt']} tokens, {sizes['new']} new tokens (greedy); "
      f"{args.runs} decode runs, median. One CPU device. params_mb: the weights held in memory.",
      common.markdown_table(rows, columns),
      f"![decode tokens/s]({name}.png)",
    ]
  )
  path = common.write(name, {"model": model, "sizes": sizes, "rows": rows}, markdown)
  plot(rows, os.path.join(common.RESULTS, f"{name}.png"), title)
  print(markdown)
  print(f"written: {path}")


if __name__ == "__main__":
  main()
