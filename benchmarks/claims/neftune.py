"""Claim 1, NEFTune (Jain et al. 2023): uniform noise on the input embeddings while fine-tuning
raises the training loss, keeps the held-out loss, and makes responses longer (Table 4).

Two settings, each fine-tuned with `train.neftune_alpha` 0, 5, 10 and 15:

- `stories`: the pretrained stories260K model (`configs/stories_finetune.yaml`) on LIMA, the
  last single-turn LIMA records held out (their reference responses are the references);
- `default`: the default model (`jaxtune train`'s default config, loaded by name) from scratch on
  the embedded task mixture; its held-out records (the mixture's held-out wordings) and a sample
  of its training records are written out to be measured the same way.

After training, each model is measured by jaxtune's own code: the clean (noise-free) held-out
loss is the loop's (`train/loop.py`: the stories setting's held-out LIMA records, the mixture's
held-out split); the model loaded back with `jaxtune.load` gives the clean loss on training
records (`eval/perplexity.py`) and its greedy responses to held-out instructions with the paper's
repetition penalty 1.2 (`eval/responses.py`): length, 2-gram repetition, log-diversity and ROUGE-L
against the references. Alpha 0 and 5 (the paper's) take every seed, 10 and 15 one.

Per-segment against row-length noise: jaxtune scales each packed example's noise by its own length
(alpha / sqrt(L_segment * d)); the popular implementation (Hugging Face's `neftune_noise_alpha`)
takes L from the row (alpha / sqrt(T * d)), which under packing shrinks every example's noise by
sqrt(L_segment / T). The ratio is measured on each setting's real packed rows.

  python benchmarks/claims/neftune.py [--quick] [--out DIR] [--seeds N]
"""

from __future__ import annotations

import json
import pathlib
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import claimlib
import numpy as np

import jaxtune
from jaxtune import config
from jaxtune.data import mixtures, pipeline, synthetic
from jaxtune.data.batches import Batches
from jaxtune.eval import base, perplexity, responses
from jaxtune.model import neftune

RECIPE = ["configs/stories_finetune.yaml"]
# Per setting: its config files, its overrides, its measurement (records measured, prompts
# answered, new tokens) and its steps. stories260K on LIMA: the recipe's rate and warmup, fewer
# steps of a smaller batch (2 cores); the default model: the default run, half its steps.
FULL = dict(
  alphas=(0.0, 5.0, 10.0, 15.0),
  stories=dict(
    steps=60,
    overrides=["train.batch_size=8", "data.max_length=256"],
    held_out=48,
    train_records=500,  # About one epoch of 60 steps of 8 rows (most examples fill a row).
    prompts=24,
    new_tokens=96,
    measured=64,
  ),
  default=dict(steps=200, overrides=[], prompts=40, new_tokens=48, measured=64),
)
QUICK = dict(
  alphas=(0.0, 5.0),
  stories=dict(
    steps=1,
    overrides=["train.batch_size=8", "data.max_length=128", *claimlib.QUICK_RUN],
    held_out=4,
    train_records=32,
    prompts=2,
    new_tokens=4,
    measured=4,
  ),
  # The other default-model claims' smoke model and steps (their compiled step is this one).
  default=dict(steps=2, overrides=list(claimlib.QUICK), prompts=2, new_tokens=4, measured=4),
)
COMMON = [
  "train.held_out_prompts=0",
  "train.checkpoint_every=100000",
  "train.log_every=5",
]
SETTINGS = {
  "stories": "stories260K (264K params) fine-tuned on LIMA",
  "default": "the default model from scratch on the embedded mixture",
}
PAPER = (
  "LLaMA-2 7B on Alpaca: AlpacaEval win rate 29.8% -> 64.7% (abstract); Sec. 5 / Table 4: "
  "NEFTune's training loss is higher and its test loss about the same, its responses markedly "
  "longer on every dataset with about the same 2-gram repetition and diversity"
)


def noise_ratio(cfg: config.Config) -> dict[str, float]:
  """Per-segment against row-length noise on the run's packed rows: the token-weighted mean of
  sqrt(T / L_segment) (how much larger jaxtune's noise is than the row-length version's) and of
  the segments per row."""
  feed_cfg = cfg.data
  batches = Batches(
    pipeline.load(feed_cfg, 0).train,
    32,
    feed_cfg.max_length,
    pack=True,
    seed=0,
    shuffle=True,
    repeat=False,
  )
  ratios, segments = [], []
  for _ in range(min(4, batches.batches_per_epoch().batches)):
    seg_bt = np.asarray(next(batches).segment_ids)
    lengths_bt = np.asarray(neftune.segment_lengths(seg_bt))
    real = lengths_bt > 0
    ratios.append(np.sqrt(seg_bt.shape[1] / lengths_bt[real]))
    segments += [len(set(row[row > 0])) for row in seg_bt]
  ratio = np.concatenate(ratios)
  return {
    "noise_ratio_mean": float(ratio.mean()),
    "noise_ratio_median": float(np.median(ratio)),
    "segments_per_row": float(np.mean(segments)),
    "row_length": int(feed_cfg.max_length),
  }


def measure(run_dir: pathlib.Path, train_path: str, eval_path: str, sizes: dict) -> dict:
  """The clean loss on training records and the response statistics of a finished run's model
  (its held-out loss is the loop's own, noise-free too)."""
  model = jaxtune.load(run_dir)
  clean = perplexity.run(
    model, base.Options(data=train_path, batch_size=8, limit=sizes["measured"])
  ).metrics["loss"]
  gen = responses.run(
    model,
    base.Options(
      data=eval_path,
      limit=sizes["prompts"],
      batch_size=8,
      max_new_tokens=sizes["new_tokens"],
      repetition_penalty=1.2,
    ),
  )
  return {"train_loss_clean": clean, **gen.metrics}


def write_messages(convs: Sequence[Any], path: pathlib.Path) -> str:
  """Conversations as a `messages` JSONL file (what the evaluation reads); returns its path."""
  with open(path, "w", encoding="utf-8") as f:
    for c in convs:
      messages = [{"role": m.role, "content": m.content} for m in c.messages]
      f.write(json.dumps({"messages": messages}) + "\n")
  return str(path)


def stories_setting(work: pathlib.Path, sizes: dict) -> tuple[list[str], list[str], str, str]:
  """(config files, overrides, training records, held-out records) of stories260K on LIMA."""
  train_path, eval_path = claimlib.lima_split(work, sizes["held_out"], sizes["train_records"])
  data = [f"data.path={train_path}", f"data.eval_path={eval_path}", "data.eval_size=0"]
  return RECIPE, [*sizes["overrides"], *data], str(train_path), str(eval_path)


def default_setting(work: pathlib.Path, sizes: dict) -> tuple[list[str], list[str], str, str]:
  """(config files, overrides, training records, held-out records) of the default run: a
  sample of seed 0's training records as its pipeline makes them (`data/pipeline.py`), and
  held-out records (fresh ones, in the held-out wordings) that no seed's run trains on."""
  cfg = config.load([], sizes["overrides"])
  data, seed = cfg.data, cfg.train.seed
  train = mixtures.mix(synthetic.tasks(seed, data.synthetic_examples), seed, 0, data.few_shot)
  held_tasks = synthetic.tasks(HELD_OUT_SEED, max(sizes["measured"] // 4, 8))
  held = mixtures.mix(held_tasks, seed, 0, 0, held_out=True)
  order = np.random.default_rng(0)  # A sample across the tasks (the mixture is task by task).
  train = [train[i] for i in order.permutation(len(train))[: sizes["measured"]]]
  held = [held[i] for i in order.permutation(len(held))]
  return (
    [],
    list(sizes["overrides"]),
    write_messages(train, work / "mixture_train.jsonl"),
    write_messages(held, work / "mixture_heldout.jsonl"),
  )


HELD_OUT_SEED = 12345  # The embedded tasks' records of seed s train the run of seed s.
SETUPS = {"stories": stories_setting, "default": default_setting}


def sweep(
  setting: str, work: pathlib.Path, sizes: dict, alphas: Sequence[float], seeds: int
) -> dict[str, Any]:
  """Every alpha of one setting (every seed at 0 and 5, one elsewhere), measured."""
  files, overrides, train_path, eval_path = SETUPS[setting](work, sizes)
  base_overrides = [*COMMON, *overrides, f"train.steps={sizes['steps']}"]
  runs = {}
  for alpha in alphas:
    for seed in range(seeds if alpha in (0.0, 5.0) else 1):
      out = work / f"{setting}_a{alpha:g}_s{seed}"
      r = claimlib.train(
        files,
        [
          *base_overrides,
          f"train.neftune_alpha={alpha}",
          f"train.seed={seed}",
          f"train.eval_every={max(sizes['steps'] // 4, 1)}",
        ],
        out,
      )
      m = measure(out, train_path, eval_path, sizes)
      last = [loss for _, loss in r["train"][-4:]]
      runs[f"{alpha:g}/{seed}"] = {
        "alpha": alpha,
        "seed": seed,
        "train_loss_noisy": float(np.mean(last)),  # The steps' loss, noise on (last logged).
        "held_out_loss": r["eval_loss_end"],
        "eval_curve": r["eval"],
        "train_curve": r["train"],
        "wall_s": r["wall_s"],
        **m,
      }
      print(f"{setting} alpha {alpha:g} seed {seed}: {runs[f'{alpha:g}/{seed}']}", flush=True)
  return {
    "runs": runs,
    "table": summarize(runs, alphas),
    "noise": noise_ratio(claimlib.load(files, base_overrides)),
    "steps": sizes["steps"],
  }


KEYS = (
  "train_loss_noisy",
  "train_loss_clean",
  "held_out_loss",
  "length_chars",
  "rep_2",
  "log_diversity",
  "rouge_l",
)


def summarize(runs: dict[str, dict], alphas: Sequence[float]) -> dict[str, dict[str, Any]]:
  return {
    f"{a:g}": {k: claimlib.spread([r[k] for r in runs.values() if r["alpha"] == a]) for k in KEYS}
    for a in alphas
  }


def plot(found: dict[str, dict], path: pathlib.Path) -> None:
  plt = claimlib.pyplot()
  fig, axes = plt.subplots(len(found), 4, figsize=(16, 3.6 * len(found)), squeeze=False)
  panels = [
    ("loss", [("train_loss_clean", "train (clean)"), ("held_out_loss", "held-out")]),
    ("step loss (noise on)", [("train_loss_noisy", "train steps")]),
    ("response length (chars)", [("length_chars", "length")]),
    ("ROUGE-L / rep-2 (%)", [("rouge_l", "ROUGE-L"), ("rep_2", "2-gram repetition")]),
  ]
  for row_axes, (setting, result) in zip(axes, found.items(), strict=True):
    table = result["table"]
    alphas = [float(a) for a in table]
    for ax, (ylabel, keys) in zip(row_axes, panels, strict=True):
      for key, label in keys:
        claimlib.errorbars(ax, alphas, [table[f"{a:g}"][key] for a in alphas], label=label)
      ax.set(xlabel="NEFTune alpha", ylabel=ylabel, xticks=alphas)
      ax.grid(alpha=0.3)
      ax.legend(fontsize=8)
    row_axes[0].set_title(f"{SETTINGS[setting]} ({result['steps']} steps)", fontsize=9, loc="left")
  fig.suptitle("NEFTune: alpha against losses and responses (mean +- std over seeds)")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


# The likely reason when a check fails (alpha 5 against 0), per setting.
WHY = {
  "stories": {
    "train_higher": "60 steps of a 264K-parameter model barely fit LIMA, so there is little "
    "over-fitting for the noise to hold back",
    "held_out_kept": "the noise slows a run this short more than it regularizes it",
    "longer": "the responses of a model this small are set by its TinyStories prior (and capped "
    "at 96 tokens), not by the length habits that NEFTune changes in the paper's 7B models",
  },
  "default": {
    "train_higher": "the mixture's answers are short and exact, and the model learns them from "
    "scratch: the noise does not raise the clean training loss at this size",
    "held_out_kept": "a model trained from scratch has no pretrained embeddings for the noise to "
    "protect; on a few hundred steps it only slows learning",
    "longer": "the mixture's answers are a number or a word ended by the end-of-turn token, so at "
    "alpha 5 the responses keep the answers' length: there is no length habit for the noise to "
    "change (compare the held-out loss wherever a larger alpha lengthens them)",
  },
}


def checks(table: dict) -> dict[str, bool]:
  """The paper's effects at alpha 5 against 0: a higher clean training loss, a held-out loss
  within 0.02 (or two seeds' spreads), longer responses (by more than the seeds' spread)."""
  off, on = table["0"], table["5"]

  def higher(key: str) -> bool:
    return on[key]["mean"] - off[key]["mean"] > max(on[key]["std"], off[key]["std"])

  held_delta = on["held_out_loss"]["mean"] - off["held_out_loss"]["mean"]
  return {
    "train_higher": higher("train_loss_clean"),
    "held_out_kept": held_delta <= max(0.02, off["held_out_loss"]["std"] * 2),
    "longer": higher("length_chars"),
  }


def figure(setting: str, result: dict) -> str:
  table, noise = result["table"], result["noise"]

  def fmt(key: str, digits: int = 3) -> str:
    return " / ".join(f"{table[a][key]['mean']:.{digits}f}" for a in table)

  return (
    f"{setting}, alpha {'/'.join(table)}: clean train loss {fmt('train_loss_clean')}, held-out "
    f"loss {fmt('held_out_loss')}, length {fmt('length_chars', 0)} chars, rep-2 "
    f"{fmt('rep_2', 1)}%, log-diversity {fmt('log_diversity', 2)}, ROUGE-L {fmt('rouge_l', 1)}; "
    f"per-segment noise x"
    f"{noise['noise_ratio_mean']:.2f} the row-length version's ({noise['segments_per_row']:.1f} "
    f"examples per {noise['row_length']}-token row)"
  )


def row(found: dict[str, dict], sizes: dict, seeds: int) -> dict[str, Any]:
  """The table's row and the checks behind its verdict, per setting."""
  found_checks = {setting: checks(result["table"]) for setting, result in found.items()}
  effects = [c[k] for c in found_checks.values() for k in ("train_higher", "longer")]
  every = [held for c in found_checks.values() for held in c.values()]
  # The paper's effects are the higher training loss and the longer responses.
  verdict = "yes" if all(every) else "no" if not any(effects) else "partly"
  stories, default = sizes["stories"], sizes["default"]
  return {
    "claim": "NEFTune: noisy embeddings raise train loss, keep held-out loss, lengthen responses",
    "paper": PAPER,
    "setting": (
      f"stories260K (264K params) fine-tuned on LIMA ({stories['steps']} steps, batch 8), "
      f"{stories['held_out']} single-turn LIMA records held out, up to {stories['new_tokens']} "
      f"new tokens; the default model from scratch on the embedded mixture "
      f"({default['steps']} steps), its held-out records, up to {default['new_tokens']} new "
      f"tokens; greedy + repetition penalty 1.2; {seeds} seeds at alpha 0 and 5, one at 10, 15"
    ),
    "ours": "; ".join(figure(setting, result) for setting, result in found.items())
    + f" (alpha 0 and 5: mean of {seeds} seeds, spreads in the JSON)",
    "holds": verdict,
    "why": "; ".join(
      f"{setting}: {WHY[setting][k]}"
      for setting, c in found_checks.items()
      for k, held in c.items()
      if not held
    ),
    "checks": found_checks,
    **{setting: {"table": r["table"], "noise": r["noise"]} for setting, r in found.items()},
  }


def main(argv: Sequence[str] | None = None) -> dict:
  args = claimlib.arguments(__doc__, argv)
  sizes = QUICK if args.quick else FULL
  if not args.quick:
    claimlib.share_compiles()
  found = {}
  with tempfile.TemporaryDirectory(prefix="claim_neftune_") as tmp:
    for setting in SETTINGS:
      work = pathlib.Path(tmp) / setting
      work.mkdir()
      found[setting] = sweep(setting, work, sizes[setting], sizes["alphas"], args.seeds)
  result = {
    **row(found, sizes, args.seeds),
    "commit": claimlib.commit(),
    "runs": {setting: r["runs"] for setting, r in found.items()},
  }
  claimlib.write(args, "neftune", result)
  plot(found, args.out / "claim_neftune.png")
  return result


if __name__ == "__main__":
  sys.exit(main() and 0)
