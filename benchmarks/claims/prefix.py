"""Claim 3, prefix tuning (Li and Liang 2021): trainable keys and values before every layer's
attention, about 0.1% of the parameters, come close to full fine-tuning; training them through an
MLP (the reparameterization) matters for stability; longer prefixes help up to a point; starting
from the activations of real words beats random values.

The pretrained stories260K model (`configs/stories_finetune.yaml` + `configs/prefix.yaml`: MLP of
width 512, initialized from the activations of that file's instruction text) is fine-tuned on
LIMA, the last single-turn records held out, for the same number of steps in every arm:

- full fine-tuning and LoRA (rank 4 on q, v), one seed each, as the references;
- a prefix of length 1 (stories260K: 320 keys and values, about 0.1% of its parameters), with the
  MLP and without (trained directly), two seeds each (the 2-core budget);
- the same from random values (one seed);
- prefix lengths 1, 4 and 16 (one seed each but the main length 1).

The held-out loss is the loop's own; the share is the prefix's parameters as decoded (the MLP
collapsed, `peft/prefix.py`) over the base model's, counted by the loop's own partition.

  python benchmarks/claims/prefix.py [--quick] [--out DIR] [--seeds N]
"""

from __future__ import annotations

import pathlib
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import claimlib

RECIPE = ["configs/stories_finetune.yaml"]
PREFIX = [*RECIPE, "configs/prefix.yaml"]
FULL = dict(steps=40, length=128, lengths=(1, 4, 16), main=1, held_out=48, train_records=320)
QUICK = dict(steps=1, length=128, lengths=(1,), main=1, held_out=4, train_records=32)
FULL_LR, PEFT_LR = 2e-3, 1e-2
PAPER = (
  "Table 1 (GPT-2 medium, E2E): prefix (0.1% of params) BLEU 69.7 vs full FT 68.2 and adapters "
  "66.3-68.9 (0.1-3%); without the MLP reparameterization performance drops and training is "
  "unstable; quality rises with prefix length up to a threshold (~200 tokens for "
  "summarization, ~10 for table-to-text); real-word init beats random in low-data settings"
)


# The likely reason when a check fails (a 264K-parameter model, 40 steps, 2 seeds at most).
WHY = {
  "near_full": "the prefix's few hundred values cannot carry what updating every weight does in "
  "a model this small (the paper's 0.1% of GPT-2 medium is 350K values)",
  "mlp_helps": "over 40 steps the direct prefix has little room to show the instability the "
  "paper saw",
  "longer_helps": "the shortest and the longest prefix end within the seeds' spread: 40 steps "
  "are too few for the extra positions to pay off (the paper trained for thousands)",
  "words_help": "the random and the real-word starts end within the seeds' spread (the random "
  "start one seed); the paper saw the gap in its low-data settings",
}


def arm(length: int, sizes: dict) -> str:
  """The arm of a prefix length in the sweep (the main length's is the MLP arm)."""
  return "prefix_mlp" if length == sizes["main"] else f"len{length}"


def row(table: dict, start: float, sizes: dict, seeds: int) -> dict[str, Any]:
  """The table's row and the checks behind its verdict; `start`: the held-out loss before."""
  main_len = sizes["main"]

  def loss(name: str) -> float:
    return table[name]["held_out_loss"]["mean"]

  def arm_of(n: int) -> str:
    return arm(n, sizes)

  gain = {name: start - loss(name) for name in table}
  mlp, direct = table["prefix_mlp"]["held_out_loss"], table["prefix_direct"]["held_out_loss"]
  lengths = sizes["lengths"]
  # The yardstick of the one-seed arms: the spread of the MLP arm over its seeds.
  noise = max(mlp["std"], direct["std"])
  ours = (
    f"held-out loss from {start:.3f}: full FT {loss('full'):.3f}, LoRA r4 {loss('lora_r4'):.3f} "
    f"({table['lora_r4']['share_pct']:.2f}%), prefix {main_len} "
    f"({table['prefix_mlp']['share_pct']:.2f}%) with MLP {mlp['mean']:.3f} +- {mlp['std']:.3f}, "
    f"direct {direct['mean']:.3f} +- {direct['std']:.3f}, "
    f"random init {loss('prefix_random'):.3f}; lengths {', '.join(map(str, lengths))}: "
    + ", ".join(f"{loss(arm_of(n)):.3f}" for n in lengths)
  )
  checks = {
    "near_full": gain["prefix_mlp"] >= 0.8 * gain["full"],
    "mlp_helps": direct["mean"] - mlp["mean"] > noise,
    "longer_helps": loss(arm_of(lengths[0])) - loss(arm_of(lengths[-1])) > noise,
    "words_help": loss("prefix_random") - loss("prefix_mlp") > noise,
  }
  verdict = {len(checks): "yes", 0: "no"}.get(sum(checks.values()), "partly")
  return {
    "claim": (
      "Prefix tuning: ~0.1% of params near full FT; MLP reparam; longer prefix; real-word init"
    ),
    "paper": PAPER,
    "setting": (
      f"stories260K on LIMA, {sizes['steps']} steps of 8 x {sizes['length']} tokens, "
      f"{sizes['held_out']} held-out single-turn LIMA records; lr {FULL_LR:g} full / {PEFT_LR:g} "
      f"prefix and LoRA; MLP width 512; {seeds} seeds (MLP vs direct)"
    ),
    "ours": ours + "; " + ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in checks.items()),
    "holds": verdict,
    "why": "; ".join(WHY[k] for k, held in checks.items() if not held),
    "checks": checks,
  }


def main(argv: Sequence[str] | None = None) -> dict:
  args = claimlib.arguments(__doc__, argv, seeds=2)
  sizes = QUICK if args.quick else FULL
  if not args.quick:
    claimlib.share_compiles()
  main_len = sizes["main"]

  def prefix(length: int, hidden: int = 512, words: bool = True) -> tuple[list[str], list[str]]:
    extra = [
      f"peft.prefix_length={length}",
      f"peft.prefix_hidden={hidden}",
      f"train.learning_rate={PEFT_LR}",
      f"train.end_learning_rate={PEFT_LR / 10}",
    ]
    return PREFIX, extra + ([] if words else ["peft.prefix_init_text="])

  lora = [
    "peft.method=lora",
    "peft.lora_targets=q,v",
    "peft.lora_rank=4",
    "peft.lora_alpha=8",
    f"train.learning_rate={PEFT_LR}",
    f"train.end_learning_rate={PEFT_LR / 10}",
  ]
  arms = {
    "full": (RECIPE, [], 1),
    "lora_r4": (RECIPE, lora, 1),
    "prefix_mlp": (*prefix(main_len), args.seeds),
    "prefix_direct": (*prefix(main_len, hidden=0), args.seeds),
    "prefix_random": (*prefix(main_len, words=False), 1),
    **{f"len{n}": (*prefix(n), 1) for n in sizes["lengths"] if n != main_len},
  }
  with tempfile.TemporaryDirectory(prefix="claim_prefix_") as tmp:
    work = pathlib.Path(tmp)
    common = claimlib.lima_finetune(work, sizes, FULL_LR, args.quick)
    runs = {}
    for name, (files, extra, seeds) in arms.items():
      for seed in range(seeds):
        r = claimlib.train(files, [*common, *extra, f"train.seed={seed}"], work / f"{name}_{seed}")
        runs[f"{name}/{seed}"] = {
          "arm": name,
          "seed": seed,
          "held_out_loss": r["eval_loss_end"],
          "start": r["eval_loss_start"],
          "eval_curve": r["eval"],
          "train_curve": r["train"],
          "wall_s": r["wall_s"],
        }
        print(f"{name} seed {seed}: held-out {r['eval_loss_end']:.4f}", flush=True)
    counts = {}
    for name, (files, extra, _) in arms.items():
      c = claimlib.param_counts(files, [*common, *extra])
      if name.startswith(("prefix", "len")):  # As decoded: the MLP collapsed to the prefix.
        c["decoded"] = claimlib.param_counts(files, [*common, *extra, "peft.prefix_hidden=0"])[
          "trainable"
        ]
      counts[name] = c
  table = {
    name: {
      "held_out_loss": claimlib.spread(
        [r["held_out_loss"] for r in runs.values() if r["arm"] == name]
      ),
      "trained": counts[name]["trainable"],
      "share_pct": 100
      * counts[name].get("decoded", counts[name]["trainable"])
      / counts[name]["base"],
    }
    for name in arms
  }
  start = next(iter(runs.values()))["start"]
  result = {
    **row(table, start, sizes, args.seeds),
    "commit": claimlib.commit(),
    "arms": table,
    "runs": runs,
  }
  claimlib.write(args, "prefix", result)
  plot(table, runs, sizes, args.out / "claim_prefix.png")
  return result


def plot(table, runs, sizes: dict, path: pathlib.Path) -> None:
  lengths = sizes["lengths"]
  plt = claimlib.pyplot()
  fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
  names = ["full", "lora_r4", "prefix_mlp", "prefix_direct", "prefix_random"]
  labels = ["full FT", "LoRA r4", "prefix+MLP", "prefix direct", "prefix random"]
  for i, name in enumerate(names):
    s = table[name]["held_out_loss"]
    axes[0].bar(i, s["mean"], yerr=s["std"], capsize=3, color=f"C{i}")
    axes[0].scatter([i] * len(s["values"]), s["values"], s=8, color="k")
  axes[0].set_xticks(
    range(len(names)),
    [f"{lab}\n{table[n]['share_pct']:.3g}%" for lab, n in zip(labels, names, strict=True)],
    fontsize=8,
  )
  low = min(table[n]["held_out_loss"]["mean"] for n in names)
  axes[0].set(ylabel="held-out loss", title="arms (% of params)", ylim=(low - 0.2, None))
  for name, color in (("prefix_mlp", "C2"), ("prefix_direct", "C3")):
    for r in (r for r in runs.values() if r["arm"] == name):
      steps, losses = zip(*r["eval_curve"], strict=True)
      axes[1].plot(steps, losses, color=color, label=name if r["seed"] == 0 else None)
  axes[1].set(xlabel="step", ylabel="held-out loss", title="with / without the MLP")
  axes[2].plot(
    lengths, [table[arm(n, sizes)]["held_out_loss"]["mean"] for n in lengths], marker="o"
  )
  axes[2].axhline(table["full"]["held_out_loss"]["mean"], color="C0", ls="--", label="full FT")
  axes[2].set(xscale="log", xlabel="prefix length", ylabel="held-out loss", title="prefix length")
  axes[2].set_xticks(lengths, [str(n) for n in lengths])
  for ax in axes[1:]:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle("Prefix tuning on stories260K + LIMA")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  sys.exit(main() and 0)
