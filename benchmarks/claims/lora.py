"""Claim 2, LoRA (Hu et al. 2021): low-rank updates of the attention's query and value projections
match full fine-tuning while training a small share of the parameters, and a very low rank
suffices (Table 6: rank 1 to 64 on W_q and W_v all within about a point).

The pretrained stories260K model (`configs/stories_finetune.yaml` + `configs/lora.yaml`'s method)
is fine-tuned on LIMA, the last single-turn records held out, for the same number of steps:
fully, and with LoRA on q and v at rank 4 (three seeds each), then LoRA at ranks 1 to 64 (one
seed; rank 4 from the three). The held-out loss is the loop's own (`train/loop.py`); the share of
parameters is trained / base parameters, counted by the loop's own partition (`peft/partition.py`).
LoRA's scale alpha / rank is kept at 2 (as configs/lora.yaml) and its learning rate is 5x full
fine-tuning's (LoRA trains at higher rates; configs/lora.yaml uses 10x for 7B models).
NEFTune is off.

  python benchmarks/claims/lora.py [--quick] [--out DIR] [--seeds N]
"""

from __future__ import annotations

import pathlib
import sys
import tempfile
from collections.abc import Sequence

import claimlib

RECIPE = ["configs/stories_finetune.yaml"]
FULL = dict(steps=40, ranks=(1, 2, 4, 8, 16, 32, 64), held_out=48, train_records=320, length=128)
QUICK = dict(steps=1, ranks=(4,), held_out=4, train_records=32, length=128)
FULL_LR, LORA_LR = 2e-3, 1e-2
PAPER = (
  "GPT-3 175B, Table 4: LoRA (rank 4 on W_q, W_v; 4.7M params, 0.003%) 73.4 vs full FT 73.8 on "
  "WikiSQL, 91.7 vs 89.5 on MultiNLI-m; Table 6: ranks 1..64 on W_q, W_v within ~0.5 pt"
)


def lora(rank: int) -> list[str]:
  return [
    "peft.method=lora",
    "peft.lora_targets=q,v",
    f"peft.lora_rank={rank}",
    f"peft.lora_alpha={2 * rank}",
    "peft.lora_dropout=0.0",
    f"train.learning_rate={LORA_LR}",
    f"train.end_learning_rate={LORA_LR / 10}",
  ]


def main(argv: Sequence[str] | None = None) -> dict:
  args = claimlib.arguments(__doc__, argv)
  sizes = QUICK if args.quick else FULL
  if not args.quick:
    claimlib.share_compiles()
  with tempfile.TemporaryDirectory(prefix="claim_lora_") as tmp:
    work = pathlib.Path(tmp)
    common = claimlib.lima_finetune(work, sizes, FULL_LR, args.quick)
    arms = {"full": [], **{f"r{r}": lora(r) for r in sizes["ranks"]}}
    runs = {}
    for name, extra in arms.items():
      seeds = args.seeds if name in ("full", "r4") else 1
      for seed in range(seeds):
        r = claimlib.train(RECIPE, [*common, *extra, f"train.seed={seed}"], work / f"{name}_{seed}")
        runs[f"{name}/{seed}"] = {
          "arm": name,
          "seed": seed,
          "held_out_loss": r["eval_loss_end"],
          "eval_curve": r["eval"],
          "train_curve": r["train"],
          "start": r["eval_loss_start"],
          "wall_s": r["wall_s"],
        }
        print(f"{name} seed {seed}: held-out {r['eval_loss_end']:.4f}", flush=True)
    counts = {
      name: claimlib.param_counts(RECIPE, [*common, *extra]) for name, extra in arms.items()
    }
  table = {
    name: {
      "held_out_loss": claimlib.spread(
        [r["held_out_loss"] for r in runs.values() if r["arm"] == name]
      ),
      "trainable": counts[name]["trainable"],
      "share_pct": 100 * counts[name]["trainable"] / counts[name]["base"],
    }
    for name in arms
  }
  full, r4 = table["full"]["held_out_loss"], table["r4"]["held_out_loss"]
  start = next(iter(runs.values()))["start"]
  gain_full, gain_r4 = start - full["mean"], start - r4["mean"]
  recovered = gain_r4 / gain_full if gain_full > 0 else float("nan")
  losses = [table[f"r{r}"]["held_out_loss"]["mean"] for r in sizes["ranks"]]
  sweep_range = max(losses) - min(losses)
  lo, hi = f"r{sizes['ranks'][0]}", f"r{sizes['ranks'][-1]}"
  ours = (
    f"held-out loss from {start:.3f}: full FT {full['mean']:.3f} +- {full['std']:.3f}, LoRA r4 q,v "
    f"{r4['mean']:.3f} +- {r4['std']:.3f} ({table['r4']['share_pct']:.2f}% of params; "
    f"{100 * recovered:.0f}% of full FT's gain); ranks {sizes['ranks'][0]}..{sizes['ranks'][-1]}: "
    + ", ".join(f"{loss:.3f}" for loss in losses)
    + f" (range {sweep_range:.3f}; {table[lo]['share_pct']:.2f}%..{table[hi]['share_pct']:.1f}%"
    " of params)"
  )
  close = r4["mean"] - full["mean"] <= 0.05 * gain_full if gain_full > 0 else False
  flat = sweep_range <= 0.1 * max(gain_full, 1e-9)
  verdict = {2: "yes", 0: "no"}.get(close + flat, "partly")
  result = {
    "claim": "LoRA: rank 4 on q, v matches full fine-tuning; low ranks suffice",
    "paper": PAPER,
    "setting": (
      f"stories260K on LIMA, {sizes['steps']} steps of 8 x {sizes['length']} tokens, held-out: "
      f"{sizes['held_out']} single-turn LIMA records; lr {FULL_LR:g} full / {LORA_LR:g} LoRA, "
      f"alpha/r = 2; {args.seeds} seeds (full, r4)"
    ),
    "ours": ours,
    "holds": verdict,
    "why": "; ".join(
      reason
      for reason, failed in (
        (
          "full fine-tuning ends lower at equal steps: a 264K-parameter model of width 64 has "
          "little of the redundancy a low-rank update exploits in the paper's 175B model",
          not close,
        ),
        (
          f"the rank sweep is not flat (rank {sizes['ranks'][losses.index(max(losses))]} ends "
          f"{sweep_range:.3f} above the best): alpha / r is held at 2 with one learning rate for "
          "every rank, so a high rank's update is the largest (the paper fixed alpha, so its "
          "scale fell with rank), and 40 steps leave no time to settle",
          not flat,
        ),
      )
      if failed
    ),
    "commit": claimlib.commit(),
    "arms": table,
    "runs": runs,
  }
  claimlib.write(args, "lora", result)
  plot(table, runs, sizes["ranks"], args.out / "claim_lora.png")
  return result


def plot(table: dict, runs: dict, ranks: Sequence[int], path: pathlib.Path) -> None:
  plt = claimlib.pyplot()
  fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
  for name, color in (("full", "C0"), ("r4", "C1")):
    for r in (r for r in runs.values() if r["arm"] == name):
      steps, losses = zip(*r["eval_curve"], strict=True)
      label = ("full FT" if name == "full" else "LoRA r4 q,v") if r["seed"] == 0 else None
      axes[0].plot(steps, losses, color=color, alpha=0.8, label=label)
  axes[0].set(xlabel="step", ylabel="held-out loss", title="equal steps")
  full = table["full"]["held_out_loss"]
  axes[1].axhspan(full["mean"] - full["std"], full["mean"] + full["std"], color="C0", alpha=0.2)
  axes[1].axhline(full["mean"], color="C0", label="full FT")
  claimlib.errorbars(
    axes[1], ranks, [table[f"r{r}"]["held_out_loss"] for r in ranks], color="C1", label="LoRA q,v"
  )
  axes[1].set(xscale="log", xlabel="LoRA rank", ylabel="held-out loss", title="rank sweep")
  axes[1].set_xticks(ranks, [str(r) for r in ranks])
  axes[2].plot(ranks, [table[f"r{r}"]["share_pct"] for r in ranks], marker="o", color="C1")
  axes[2].axhline(100, color="C0", label="full FT (100%)")
  axes[2].set(
    xscale="log",
    yscale="log",
    xlabel="LoRA rank",
    ylabel="% of parameters trained",
    title="share trained",
  )
  axes[2].set_xticks(ranks, [str(r) for r in ranks])
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle("LoRA on stories260K + LIMA")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  sys.exit(main() and 0)
