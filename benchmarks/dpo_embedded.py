"""DPO on data no one made up for the test: the default run's SFT model against its own mistakes.

1. SFT: the embedded default run (`jaxtune train` with no config), unless `--sft` names one.
2. Pairs: the SFT model samples an answer (temperature `--temperature`) to each of `--prompts`
   training prompts of the embedded tasks; each wrong one (the response text differs from the
   task's reference) makes a pair, chosen = the reference, rejected = the model's own sample.
3. DPO with LoRA (rank 8; the reference is the SFT model, adapters off) on those pairs.
4. Held-out exact match (greedy, the tasks' held-out templates) before and after, and the KL to
   the reference at the end of DPO (per response, from metrics.jsonl).

Run: `python benchmarks/dpo_embedded.py --out /tmp/dpo_embedded` (about 10 minutes on 2 cores).
Writes benchmarks/results/dpo_embedded[_TAG].{json,md,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import common  # noqa: F401  (sets the host's malloc before JAX starts)

from jaxtune import api, config, generate
from jaxtune.data import packing, pipeline
from jaxtune.data.packing import Stats
from jaxtune.train import held_out as held_out_eval
from jaxtune.train import loop


def answers(model, convs, sampling, seed=0) -> list[str]:
  prompts = [
    packing.prompt_ids(
      dataclasses.replace(c, messages=c.messages[:-1]), model.template, model.tokenizer
    )
    for c in convs
  ]
  done = model.generate(prompts, sampling, seed=seed, batch_size=64)
  return [model.tokenizer.decode(c.ids).strip() for c in done]


def exact(convs, answers) -> float:
  """The share of answers that are their conversation's reference, as the default run scores."""
  pairs = zip(answers, convs, strict=True)
  return sum(held_out_eval.exact_match(a, c.messages[-1].content) for a, c in pairs) / len(convs)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", required=True)
  parser.add_argument("--sft", default="")
  parser.add_argument("--prompts", type=int, default=1200)
  parser.add_argument("--temperature", type=float, default=1.0)
  parser.add_argument("--steps", type=int, default=120)
  parser.add_argument("--beta", type=float, default=0.1)
  parser.add_argument("--lr", type=float, default=2e-3)
  parser.add_argument("--objective", default="dpo", help="dpo, ipo, simpo or reward")
  parser.add_argument("--eval-size", type=int, default=32, help="pairs held out")
  parser.add_argument("--tag", default="", help="names the results (dpo_embedded_TAG)")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  sft_dir = args.sft or os.path.join(args.out, "sft")
  sft_cfg = config.load(None, [f"train.output_dir={sft_dir}"])
  if not args.sft and not os.path.isdir(os.path.join(sft_dir, "checkpoints")):
    loop.run(sft_cfg)
  sft = api.load(sft_dir)
  convs = pipeline.conversations(sft_cfg.data, sft_cfg.train.seed, Stats())
  train = convs.train[:: max(len(convs.train) // args.prompts, 1)][: args.prompts]
  held_out = convs.held_out
  sample = generate.Sampling(max_new_tokens=96, temperature=args.temperature)
  samples = answers(sft, train, sample, seed=1)
  pairs = [
    {"prompt": c.messages[-2].content, "chosen": c.messages[-1].content, "rejected": s}
    for c, s in zip(train, samples, strict=True)
    if s and s != c.messages[-1].content.strip()
  ]
  pairs_path = os.path.join(args.out, "pairs.jsonl")
  with open(pairs_path, "w") as f:
    f.writelines(json.dumps(p) + "\n" for p in pairs)
  name = "dpo_embedded" + (f"_{args.tag}" if args.tag else "")
  dpo_dir = os.path.join(args.out, name)
  dpo_cfg = config.load(
    None,
    [
      f"data.path={pairs_path}",
      "data.format=pairwise",
      f"data.tokenizer={os.path.join(sft_dir, 'tokenizer')}",
      f"data.template={sft_cfg.data.template}",
      "data.max_length=256",
      f"data.eval_size={args.eval_size}",
      "data.on_bad_record=skip",
      "peft.method=lora",
      f"train.objective={args.objective}",
      f"train.preference_beta={args.beta}",
      f"train.init_from={sft_dir}",
      f"train.steps={args.steps}",
      "train.batch_size=16",
      f"train.learning_rate={args.lr}",
      f"train.end_learning_rate={args.lr / 10}",
      "train.warmup_steps=10",
      "train.log_every=10",
      f"train.eval_every={args.steps // 4}",
      f"train.checkpoint_every={args.steps}",
      f"train.output_dir={dpo_dir}",
    ],
  )
  summary = loop.run(dpo_cfg)
  if args.objective == "reward":
    _reward_results(args, name, summary, len(train), len(pairs))
    return
  dpo = api.load(dpo_dir)
  greedy = generate.Sampling(max_new_tokens=96)
  before, after = exact(held_out, answers(sft, held_out, greedy)), None
  after = exact(held_out, answers(dpo, held_out, greedy))
  records = [json.loads(line) for line in open(os.path.join(dpo_dir, "metrics.jsonl"))]
  steps = [r for r in records if "accuracy" in r]
  results = {
    "sft_run": sft_dir,
    "sampled_prompts": len(train),
    "sampled_right": len(train) - len(pairs),
    "pairs": len(pairs),
    "objective": args.objective,
    "dpo_steps": args.steps,
    "beta": args.beta,
    "learning_rate": args.lr,
    "held_out_prompts": len(held_out),
    "held_out_exact_match_sft": before,
    "held_out_exact_match_dpo": after,
    "held_out_dpo_loss": [summary["eval_loss_start"], summary["eval_loss_end"]],
    "kl_end": steps[-1]["kl"],
    "train_accuracy_end": steps[-1]["accuracy"],
    "curve": [{k: r[k] for k in ("step", "loss", "accuracy", "kl", "margin")} for r in steps],
  }
  rows = [
    {"model": "SFT (default run)", "held-out exact match": f"{100 * before:.1f}%"},
    {
      "model": f"+ {args.objective} ({args.steps} steps, LoRA, beta {args.beta}, lr {args.lr})",
      "held-out exact match": f"{100 * after:.1f}%",
    },
  ]
  markdown = (
    "# DPO on the SFT model's own mistakes (embedded tasks)\n\n"
    f"{len(train)} training prompts sampled at temperature {args.temperature}: "
    f"{len(train) - len(pairs)} right, {len(pairs)} wrong -> pairs (chosen = reference). "
    f"Held-out: {len(held_out)} prompts of the tasks' held-out templates, greedy.\n\n"
    + common.markdown_table(rows, ["model", "held-out exact match"])
    + f"\n\nHeld-out DPO loss {summary['eval_loss_start']:.4f} -> {summary['eval_loss_end']:.4f}; "
    f"at the last step: preference accuracy {steps[-1]['accuracy']:.3f}, "
    f"KL to the reference {steps[-1]['kl']:.3f} nats per response.\n"
  )
  common.write(name, results, markdown)
  _plot(results, name)


def _reward_results(args, name: str, summary, sampled: int, pairs: int) -> None:
  """A reward model on the same pairs: its held-out pairwise accuracy before and after."""
  results = {
    "objective": "reward",
    "sampled_prompts": sampled,
    "pairs": pairs,
    "held_out_pairs": args.eval_size,
    "steps": args.steps,
    "learning_rate": args.lr,
    "held_out_accuracy": [summary["eval_loss_start"], summary["eval_loss_end"]],
  }
  markdown = (
    "# A reward model on the SFT model's own mistakes (embedded tasks)\n\n"
    f"{pairs} pairs (chosen = the reference, rejected = the SFT model's wrong sample), "
    f"{args.eval_size} held out; LoRA rank 8 and the scalar head, {args.steps} steps, lr {args.lr}."
    f"\n\nHeld-out pairwise accuracy {summary['eval_loss_start']:.3f} -> "
    f"{summary['eval_loss_end']:.3f}.\n"
  )
  common.write(name, results, markdown)


def _plot(results, name: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  curve = results["curve"]
  fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
  axes[0].bar(
    ["SFT", "SFT + DPO"],
    [results["held_out_exact_match_sft"], results["held_out_exact_match_dpo"]],
  )
  axes[0].set_title("held-out exact match")
  for ax, key in zip(axes[1:], ("accuracy", "kl"), strict=True):
    ax.plot([r["step"] for r in curve], [r[key] for r in curve])
    ax.set_title(f"DPO training {key}")
    ax.set_xlabel("step")
  fig.tight_layout()
  fig.savefig(os.path.join(common.RESULTS, f"{name}.png"), dpi=100)


if __name__ == "__main__":
  main()
