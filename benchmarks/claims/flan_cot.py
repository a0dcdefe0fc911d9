"""Flan's chain-of-thought mixture (Chung et al. 2022): fine-tuning on direct answers only hurts
chain-of-thought prompting, chain-of-thought only hurts direct answers, and the mixture of both
does well on both.

The embedded tasks that have worked steps (arithmetic, reverse, counting) are rendered three ways,
each record with one template drawn from the allowed bank: `direct` (the tasks' templates without
a rationale: plain and answer-options), `cot` (only the templates that write the rationale before
the answer) and `mixture` (all of them). The same number of records and the same steps train the
default model from scratch with `jaxtune train` on each, with one tokenizer (the mixture's) for
all. Held-out records of the same tasks are then asked both ways, greedily: directly (the plain
template) and with the task's chain-of-thought trigger ("Show your work.", "Think step by
step.", "Count one by one."). The answer is what follows "the answer is" when the output says it,
else the whole output; it is right when it equals the record's answer.

  python benchmarks/claims/flan_cot.py [--quick] [--seeds 3]
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import tempfile
from collections.abc import Sequence
from typing import Any

import claimlib
import numpy as np

from jaxtune import api, config
from jaxtune.data import mixtures, synthetic
from jaxtune.data.formats import Conversation, Message
from jaxtune.train import held_out

NAME = "flan_cot"
ARMS = ("direct", "cot", "mixture")
MODES = ("direct", "cot")  # How a held-out question is asked.
_ANSWER = re.compile(r"answer is (.+?)\.?\s*$", re.S)


def is_cot(template: mixtures.TaskTemplate) -> bool:
  return "{rationale}" in template.response


def cot_tasks(seed: int, records: int) -> list[mixtures.Task]:
  """The embedded tasks that have worked steps."""
  return [t for t in synthetic.tasks(seed, records) if any(map(is_cot, t.templates))]


def arm_tasks(tasks: Sequence[mixtures.Task], arm: str) -> list[mixtures.Task]:
  keep = {"direct": lambda t: not is_cot(t), "cot": is_cot, "mixture": lambda t: True}[arm]
  return [dataclasses.replace(t, templates=tuple(filter(keep, t.templates))) for t in tasks]


def write_arm(tasks: Sequence[mixtures.Task], arm: str, seed: int, path: pathlib.Path) -> int:
  """The arm's training conversations as a `messages` JSONL file; returns their count."""
  convs = mixtures.mix(arm_tasks(tasks, arm), seed, cap=0, few_shot=0)
  with open(path, "w", encoding="utf-8") as f:
    for c in convs:
      messages = [{"role": m.role, "content": m.content} for m in c.messages]
      f.write(json.dumps({"messages": messages}) + "\n")
  return len(convs)


def questions(tasks: Sequence[mixtures.Task], mode: str, n: int) -> list[Conversation]:
  """`n` records of each task asked `mode`-ly; the reference is the worked answer (so that the
  answer budget fits a rationale whichever way the model answers)."""
  out = []
  for t in tasks:
    plain = next(x for x in t.templates if x.prompt == "{question}")
    cot = next(x for x in t.templates if is_cot(x))
    for i in range(n):
      record = t.records[i]
      prompt = (plain if mode == "direct" else cot).render(record)[0]
      out.append(
        Conversation(
          (Message("user", prompt), Message("assistant", cot.render(record)[1])),
          f"{t.name}[{i}]",
        )
      )
  return out


def final_answer(text: str) -> str:
  m = _ANSWER.search(text.strip())
  return (m.group(1) if m else text).strip()


def accuracy(model: api.Model, tasks: Sequence[mixtures.Task], mode: str, n: int) -> dict:
  convs = questions(tasks, mode, n)
  prompts = held_out.select(convs, model.tokenizer, model.template, model.config.max_seq_len, n)
  answers = held_out.answer(
    model.module, model.params, prompts, model.tokenizer, model.template, None, None
  )
  records = {held_out.family(c.where): [] for c in prompts.conversations}
  for c, a in zip(prompts.conversations, answers, strict=True):
    index = int(c.where.split("[")[1].rstrip("]"))
    task = next(t for t in tasks if t.name == held_out.family(c.where))
    records[held_out.family(c.where)].append(final_answer(a) == task.records[index]["answer"])
  every = [x for v in records.values() for x in v]
  return {
    "acc": float(np.mean(every)),
    "per_task": {k: float(np.mean(v)) for k, v in records.items()},
    "examples": [
      (c.messages[0].content, a)
      for c, a in list(zip(prompts.conversations, answers, strict=True))[:: max(n, 1)]
    ],
  }


def plot(result: dict[str, Any], path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4))
  width = 0.38
  for j, (mode, color) in enumerate(zip(MODES, ("#1f77b4", "#ff7f0e"), strict=True)):
    means = [100 * result["arms"][a][mode]["mean"] for a in ARMS]
    stds = [100 * result["arms"][a][mode]["std"] for a in ARMS]
    xs = [i + (j - 0.5) * width for i in range(len(ARMS))]
    ax.bar(xs, means, width, yerr=stds, color=color, capsize=3, label=f"asked {mode}")
  ax.set_xticks(range(len(ARMS)), [f"trained on {a}" for a in ARMS])
  ax.set_ylabel("held-out answer accuracy (%)")
  ax.set_title(
    f"embedded CoT tasks, default model, {result['steps']} steps, {result['seeds']} seeds",
    fontsize=10,
  )
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=90)


def verdict(result: dict[str, Any]) -> tuple[str, str, str]:
  arms = result["arms"]

  def cell(a, m):
    return f"{100 * arms[a][m]['mean']:.0f}±{100 * arms[a][m]['std']:.0f}%"

  ours = "; ".join(
    f"trained {a}: asked direct {cell(a, 'direct')}, asked CoT {cell(a, 'cot')}" for a in ARMS
  )
  mix = arms["mixture"]
  noise = max(arms[a][m]["std"] for a in ARMS for m in MODES)
  # The mixture is within noise of the best arm in each mode, and each single-format arm is
  # clearly worse than the mixture in the mode it did not train.
  mixture_good = all(
    mix[m]["mean"] >= max(arms[a][m]["mean"] for a in ARMS) - 2 * noise - 0.02 for m in MODES
  )
  direct_hurts_cot = arms["direct"]["cot"]["mean"] < mix["cot"]["mean"] - 2 * noise - 0.02
  cot_hurts_direct = arms["cot"]["direct"]["mean"] < mix["direct"]["mean"] - 2 * noise - 0.02
  parts = (mixture_good, direct_hurts_cot, cot_hurts_direct)
  holds = "yes" if all(parts) else "partly" if any(parts) else "no"
  why = []
  if not mixture_good:
    why.append("the mixture is not as good as the best single-format arm in both modes")
  if not direct_hurts_cot:
    why.append("training on direct answers only did not hurt chain-of-thought prompting here")
  if not cot_hurts_direct:
    why.append("training on chain of thought only did not hurt direct answers here")
  if why:
    why.append(
      "a from-scratch model of a few hundred steps learns the formats it saw; Flan's effect is "
      "on held-out tasks (MMLU, BBH) of 8B-540B pretrained models"
    )
  return ours, holds, "; ".join(why)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = claimlib.arguments(__doc__, argv)
  default = config.load([], [])
  tmp = pathlib.Path(tempfile.mkdtemp(prefix="claim_flan_cot_"))
  steps = 2 if args.quick else 200
  records = 20 if args.quick else default.data.synthetic_examples
  n_eval = 2 if args.quick else 30
  quick = list(claimlib.QUICK) if args.quick else []
  train_tasks = cot_tasks(0, records)
  eval_tasks = cot_tasks(4321, max(n_eval, 8))  # Records no arm trains on.
  if not args.quick:
    claimlib.share_compiles(tmp / "compiled")
  arms: dict[str, Any] = {a: {m: [] for m in MODES} for a in ARMS}
  sizes, tokenizer = {}, ""
  for seed in range(args.seeds):
    for arm in ("mixture", "direct", "cot"):  # The mixture first: its tokenizer serves all.
      data = tmp / f"{arm}.jsonl"
      sizes[arm] = write_arm(train_tasks, arm, 0, data)
      out = tmp / f"{arm}{seed}"
      claimlib.train(
        [],
        [
          *quick,
          f"data.path={data}",
          "data.eval_size=32",
          *([f"data.tokenizer={tokenizer}"] if tokenizer else []),
          f"train.steps={steps}",
          f"train.seed={seed}",
          "train.held_out_prompts=0",
          f"train.checkpoint_every={steps}",
        ],
        out,
      )
      tokenizer = tokenizer or str(out / "tokenizer")
      model = api.load(out)
      for mode in MODES:
        arms[arm][mode].append(accuracy(model, eval_tasks, mode, n_eval))
  result: dict[str, Any] = {
    "commit": claimlib.commit(),
    "steps": steps,
    "seeds": args.seeds,
    "train_examples": sizes,
    "eval_questions": n_eval * len(eval_tasks),
    "tasks": [t.name for t in train_tasks],
    "arms": {
      a: {
        m: {
          **claimlib.spread([r["acc"] for r in arms[a][m]]),
          "per_task": {
            k: claimlib.spread([r["per_task"][k] for r in arms[a][m]])
            for k in arms[a][m][0]["per_task"]
          },
          "examples": arms[a][m][0]["examples"],
        }
        for m in MODES
      }
      for a in ARMS
    },
  }
  ours, holds, why = verdict(result)
  result.update(
    claim="Flan: only the CoT + non-CoT mixture does well both with and without CoT prompting "
    "(Chung et al. 2022)",
    paper=(
      "Flan-PaLM 540B, held-out MMLU/BBH: fine-tuning without CoT data degrades CoT prompting; "
      "with both, CoT and direct prompting both improve (Fig. 5, Sec. 3)"
    ),
    setting=(
      f"default model from scratch, {steps} steps per arm, embedded tasks with worked steps "
      f"(arithmetic, reverse, counting; {records} records each, {sizes.get('mixture')} examples "
      f"per arm), {n_eval} held-out records per task asked directly and with the CoT trigger, "
      f"{args.seeds} seeds"
    ),
    ours=ours,
    holds=holds,
    why=why,
  )
  claimlib.write(args.out, NAME, result, args.quick)
  plot(result, args.out / f"claim_{NAME}.png")
  return result


if __name__ == "__main__":
  main()
