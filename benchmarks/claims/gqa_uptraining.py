"""Claim 4, GQA uptraining (Ainslie et al. 2023): a multi-head checkpoint converted to grouped-query
attention by mean-pooling its K/V heads, then trained for about 5% of its original steps, comes
back close to the multi-head model, decodes faster, and mean-pooling beats keeping the first head
of each group or starting the K/V heads from random values.

The source is the default model (the default config, loaded by name) trained with multi-head
attention on the embedded mixture. It is converted to GQA with a quarter of its KV heads and to
MQA (one KV head) three ways: mean-pooling (`jaxtune.convert.uptrain.to_kv_heads`, the paper's),
the first head of each group, and random K/V projections (a fresh initialization of the smaller
model's, drawn by seed). Each conversion is written as a jaxtune run (`convert/export.save_run`)
and uptrained with `train.init_from` on the same data, from each seed, at a constant rate the
source's schedule passed near its end (after a short warm-up) for 10% of the source's steps; the
loop's held-out loss every 2.5% gives the curve from 0% (before the first step) through the
paper's 5%, against the source's own. Decode speed: `benchmarks/decode.py`'s `measure_batch` on
the source and the mean-pooled conversions.

  python benchmarks/claims/gqa_uptraining.py [--quick] [--out DIR] [--seeds N]
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import claimlib
import decode
import flax.linen as nn
import jax
import numpy as np

import jaxtune
from jaxtune import config, runs
from jaxtune.convert import export, uptrain
from jaxtune.model import transformer

# Uptraining continues the source's recipe at a rate its schedule passed near its end (the paper
# uptrains with the original recipe; a converted model is nearly trained, and the source's peak
# rate undoes more than it repairs), held constant after a short warm-up for the fresh Adam
# moments, so that the curve's first `share` of steps is a run of that length: one run gives
# every point of the curve (every `share / points` of the source's steps).
FULL = dict(
  source_steps=200,
  share=0.1,
  points=4,
  uptrain_lr=1e-3,
  warmup=4,
  batches=(1, 16),
  decode=dict(prompt=128, new=32),
  runs=3,
  mqa=True,
  data=[],
)
QUICK = dict(
  source_steps=2,
  share=0.5,
  points=1,
  uptrain_lr=1e-3,
  warmup=1,
  batches=(2,),
  decode=dict(prompt=8, new=4),
  runs=1,
  mqa=False,
  data=list(claimlib.QUICK),
)
COMMON = ["train.held_out_prompts=0", "train.checkpoint_every=100000", "train.log_every=5"]
PAPER = (
  "Table 1 (T5-XXL, uptrained 5%): MHA 47.2 avg, GQA-8 47.1, MQA 46.6; GQA-8 decodes in "
  "0.28 s vs MHA 1.51 s per sample; conversion study: mean-pooling > first head > random"
)


def first_head(cfg, params: dict[str, Any], kv_heads: int, seed: int) -> dict[str, Any]:
  """The first K/V head of each group kept, the others dropped."""
  del seed
  g = cfg.kv_heads // kv_heads
  attn = dict(params["layers"]["attn"])
  for name in ("k", "v"):
    attn[name] = {
      key: (x[:, :, ::g] if key == "kernel" else x[:, ::g]) for key, x in attn[name].items()
    }
  return dict(params, layers=dict(params["layers"], attn=attn))


def random_heads(cfg, params: dict[str, Any], kv_heads: int, seed: int) -> dict[str, Any]:
  """K/V projections as a fresh model with `kv_heads` initializes them; the rest kept."""
  small = transformer.Transformer(dataclasses.replace(cfg, num_kv_heads=kv_heads))
  fresh = nn.meta.unbox(jax.jit(transformer.init_fn(small))(jax.random.key(seed)))["params"]
  attn = dict(params["layers"]["attn"])
  for name in ("k", "v"):
    attn[name] = fresh["layers"]["attn"][name]
  return dict(params, layers=dict(params["layers"], attn=attn))


def mean_pool(cfg, params: dict[str, Any], kv_heads: int, seed: int) -> dict[str, Any]:
  del seed
  return uptrain.to_kv_heads(cfg, {"params": params}, kv_heads)[1]["params"]


CONVERSIONS = {"mean": mean_pool, "first": first_head, "random": random_heads}


def convert(
  source: jaxtune.api.Model, how: str, kv_heads: int, seed: int, folder: pathlib.Path
) -> None:
  params = CONVERSIONS[how](source.config, source.params, kv_heads, seed)
  cfg = dataclasses.replace(source.config, num_kv_heads=kv_heads)
  export.save_run(dataclasses.replace(source, config=cfg, params=jax.device_put(params)), folder)


def decode_speed(models: dict[str, tuple[Any, Any]], sizes: dict) -> list[dict[str, Any]]:
  rows, bandwidth = [], decode.common.memory_bandwidth(64)["best"]
  for batch in sizes["batches"]:
    rows += decode.measure_batch(models, batch, sizes["decode"], sizes["runs"], bandwidth)
  return rows


def verdict(result: dict[str, Any]) -> tuple[dict[str, bool], str, str, str]:
  """(checks, our figure, holds, why) of a run's `result` (its source, arms, uptraining and
  decode speed)."""
  source, up, arms = result["source"]["held_out_loss"], result["uptraining"], result["arms"]
  steps, five = result["source"]["steps"], up["five_pct_step"]
  targets = {key.split("/")[0]: arm["kv_heads"] for key, arm in arms.items()}
  biggest = max(r["batch"] for r in result["decode"])
  speed = {r["variant"]: r["speedup_vs_mha"] for r in result["decode"] if r["batch"] == biggest}
  points = {"at_0": "0%", "at_5pct": "5%", "at_end": f"{100 * up['steps'] / steps:.0f}%"}

  def best(key: str, target: str) -> str:
    return min(CONVERSIONS, key=lambda h: arms[f"{target}/{h}"][key]["mean"])

  def mean_best(key: str) -> bool:
    return all(best(key, t) == "mean" for t in targets)

  def gap(key: str) -> float:
    return arms["GQA/mean"][key]["mean"] - source

  checks = {
    "mean_best_at_0": mean_best("at_0"),
    "mean_best_at_5pct": mean_best("at_5pct"),
    "recovered": gap("at_5pct") <= 0.1 * max(gap("at_0"), 1e-9) or gap("at_5pct") <= 0.02,
    "faster": speed.get("GQA", 0) > 1.0,
  }
  holds = {len(checks): "yes", 0: "no"}.get(sum(checks.values()), "partly")

  def cell(spread: dict[str, Any]) -> str:
    return f"{spread['mean']:.3f}" + (f"±{spread['std']:.3f}" if len(spread["values"]) > 1 else "")

  ours = (
    f"held-out loss of the MHA source {source:.3f}; "
    + "; ".join(
      f"{t} ({kv} KV heads) at {' / '.join(points.values())}: "
      + ", ".join(
        f"{h} " + " / ".join(cell(arms[f"{t}/{h}"][k]) for k in points) for h in CONVERSIONS
      )
      for t, kv in targets.items()
    )
    + "; best conversion at "
    + " / ".join(points.values())
    + ": "
    + ", ".join(f"{t} " + " / ".join(best(k, t) for k in points) for t in targets)
    + f"; decode tokens/s vs MHA at batch {biggest}: "
    + ", ".join(f"{k} x{v:.2f}" for k, v in speed.items() if k != "MHA")
  )
  leaders = {t: best("at_5pct", t) for t in targets}
  behind = [
    f"{t}: {h} {cell(arms[f'{t}/{h}']['at_5pct'])} against mean "
    + cell(arms[f"{t}/mean"]["at_5pct"])
    for t, h in leaders.items()
    if h != "mean"
  ]
  reasons = {
    "mean_best_at_0": "the source's heads are too little alike for their mean to keep what they "
    "computed (a small model trained for minutes has not made its heads redundant)",
    "mean_best_at_5pct": f"at 5% ({five} steps) every arm is still falling fast, and the order "
    f"is close to the seeds' spread ({'; '.join(behind)})"
    + (f"; mean-pooling leads again at {points['at_end']}" if mean_best("at_end") else "")
    + "; the paper's 5% is thousands of steps",
    "recovered": f"{five} uptraining steps (5% of a {steps}-step source) are too few to close "
    f"the gap the conversion opened: the mean-pooled GQA is {gap('at_5pct'):.2f} above the "
    f"source at 5% and {gap('at_end'):.2f} at {points['at_end']}, still falling",
    "faster": "fewer KV heads save nothing measurable at this size: the cache is small next to "
    "the weights, so a decoding step is not bound by reading it (GQA's "
    f"x{speed.get('GQA', 0):.2f} at batch {biggest} is no cache effect and was not investigated; "
    "the 25M-parameter model of `decode.py` shows the gain)",
  }
  return checks, ours, holds, "; ".join(reasons[k] for k, held in checks.items() if not held)


def uptrain_arm(
  source: jaxtune.api.Model,
  target: tuple[str, int],
  how: str,
  seeds: int,
  overrides: Sequence[str],
  work: pathlib.Path,
) -> dict[str, Any]:
  """One conversion uptrained from each seed: the held-out loss curves (step, loss)."""
  name, kv = target
  curves = []
  for seed in range(seeds):
    folder = work / f"{name}_{how}_{seed}"
    convert(source, how, kv, seed, folder / "converted")
    r = claimlib.train(
      [],
      [
        *overrides,
        f"model.num_kv_heads={kv}",
        f"train.init_from={folder / 'converted'}",
        f"train.seed={seed}",
      ],
      folder / "uptrained",
    )
    curves.append(r["eval"])
  return {"kv_heads": kv, "curves": curves}


def main(argv: Sequence[str] | None = None) -> dict:
  args = claimlib.arguments(__doc__, argv, seeds=3)
  commit = claimlib.commit()  # Before the runs: the code they run.
  sizes = QUICK if args.quick else FULL
  if not args.quick:
    claimlib.share_compiles()
  # The default config, by name: its model and mixture as they are now (in quick mode, shrunk).
  default = config.load([], sizes["data"])
  heads = default.model.num_heads
  targets = {"GQA": max(heads // 4, 1), **({"MQA": 1} if sizes["mqa"] else {})}
  steps = sizes["source_steps"]
  uptrain_steps = max(round(sizes["share"] * steps), 1)
  every = max(uptrain_steps // sizes["points"], 1)
  five = max(round(0.05 * steps), 1)  # The paper's 5%: a point of the curve.
  with tempfile.TemporaryDirectory(prefix="claim_gqa_") as tmp:
    work = pathlib.Path(tmp)
    src_dir = work / "source"
    src = claimlib.train(
      [],
      [
        *COMMON,
        *sizes["data"],
        f"model.num_kv_heads={heads}",
        f"train.steps={steps}",
        f"train.eval_every={max(steps // 4, 1)}",
      ],
      src_dir,
    )
    source = jaxtune.load(src_dir)
    uptraining = [
      *COMMON,
      *sizes["data"],
      f"data.tokenizer={src_dir / runs.TOKENIZER}",
      f"train.steps={uptrain_steps}",
      "train.schedule=constant",
      f"train.learning_rate={sizes['uptrain_lr']}",
      f"train.warmup_steps={sizes['warmup']}",
      f"train.eval_every={every}",
      "train.final_checkpoint=false",  # Measured by its held-out losses alone.
    ]
    arms, models = {}, {"MHA": (source.module, source.params)}
    for target, kv in targets.items():
      for how in CONVERSIONS:
        arm = uptrain_arm(source, (target, kv), how, args.seeds, uptraining, work)
        at = {step: claimlib.spread(v) for step, v in _by_step(arm["curves"]).items()}
        arms[f"{target}/{how}"] = {**arm, "at_0": at[0], "at_5pct": at[five], "at_end": at[max(at)]}
        print(f"{target} {how}: {at}", flush=True)
      # Decode speed depends on the shapes alone: the mean-pooled conversion of seed 0.
      model = jaxtune.load(work / f"{target}_mean_0" / "converted")
      models[target] = (model.module, model.params)
    speed = decode_speed(models, sizes)
  share_end = 100 * uptrain_steps / steps
  result = {
    "claim": "GQA uptraining: mean-pooled K/V heads + ~5% steps recover MHA quality, decode faster",
    "paper": PAPER,
    "setting": (
      f"default model ({heads} heads, MHA) trained {steps} steps on the embedded mixture; "
      f"converted to {' and '.join(map(str, targets.values()))} KV heads, uptrained "
      f"{uptrain_steps} steps ({share_end:.0f}%; 5% = {five} steps) at a constant "
      f"{sizes['uptrain_lr']:g} after {sizes['warmup']} warm-up steps (the source: "
      f"{default.train.learning_rate:g} peak, cosine to {default.train.end_learning_rate:g}), "
      f"{args.seeds} seeds; decode: prompt {sizes['decode']['prompt']}, "
      f"{sizes['decode']['new']} new tokens, batch "
      f"{', '.join(map(str, sizes['batches']))}, 1 CPU device"
    ),
    "commit": commit,
    "source": {"steps": steps, "held_out_loss": src["eval_loss_end"], "eval_curve": src["eval"]},
    "uptraining": {
      "steps": uptrain_steps,
      "five_pct_step": five,
      "learning_rate": sizes["uptrain_lr"],
      "warmup_steps": sizes["warmup"],
    },
    "arms": arms,
    "decode": speed,
  }
  checks, ours, holds, why = verdict(result)
  result.update(ours=ours, holds=holds, why=why, checks=checks)
  claimlib.write(args, "gqa_uptraining", result)
  plot(result, targets, args.out / "claim_gqa_uptraining.png", steps)
  return result


def _by_step(curves: Sequence[Sequence[tuple[int, float]]]) -> dict[int, list[float]]:
  """Seeds' curves [(step, loss)] -> step -> the seeds' losses."""
  out: dict[int, list[float]] = {}
  for curve in curves:
    for step, loss in curve:
      out.setdefault(int(step), []).append(loss)
  return out


def plot(result: dict, targets: dict, path: pathlib.Path, steps: int) -> None:
  plt = claimlib.pyplot()
  fig, axes = plt.subplots(1, len(targets) + 1, figsize=(5 * (len(targets) + 1), 3.8))
  source = result["source"]["held_out_loss"]
  for ax, target in zip(axes[:-1], targets, strict=True):
    for i, how in enumerate(CONVERSIONS):
      by_step = _by_step(result["arms"][f"{target}/{how}"]["curves"])
      xs = [100 * step / steps for step in by_step]
      claimlib.errorbars(
        ax, xs, [claimlib.spread(v) for v in by_step.values()], color=f"C{i}", label=how
      )
    ax.axhline(source, color="k", ls="--", label="MHA source")
    ax.axvline(5, color="gray", lw=0.5)
    ax.set(
      xlabel="uptraining, % of the source's steps",
      ylabel="held-out loss",
      title=f"{target} ({targets[target]} KV heads)",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  rows = result["decode"]
  batches = sorted({r["batch"] for r in rows})
  names = list(dict.fromkeys(r["variant"] for r in rows))
  width = 0.8 / len(names)
  for i, name in enumerate(names):
    values = [
      next(r["decode_tokens_per_s"] for r in rows if r["batch"] == b and r["variant"] == name)
      for b in batches
    ]
    axes[-1].bar(np.arange(len(batches)) + i * width, values, width, label=name)
  axes[-1].set_xticks(np.arange(len(batches)) + width, [f"batch {b}" for b in batches])
  axes[-1].set(ylabel="decode tokens/s", title="decode speed (KV cache)")
  axes[-1].legend(fontsize=8)
  fig.suptitle("GQA uptraining of the default model")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  sys.exit(main() and 0)
