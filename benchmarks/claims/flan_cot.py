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
import jax
import numpy as np

from jaxtune import api, config
from jaxtune.data import mixtures, packing, synthetic, templates
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


def questions(
  tasks: Sequence[mixtures.Task], mode: str, n: int, reference: str = "cot"
) -> list[Conversation]:
  """`n` records of each task asked `mode`-ly, answered by the `reference` template's response
  (the worked answer by default: the answer budget then fits a rationale whichever way the model
  answers)."""
  out = []
  for t in tasks:
    bank = {
      "direct": next(x for x in t.templates if x.prompt == "{question}"),
      "cot": next(x for x in t.templates if is_cot(x)),
    }
    for i in range(n):
      record = t.records[i]
      prompt, response = bank[mode].render(record)[0], bank[reference].render(record)[1]
      out.append(
        Conversation((Message("user", prompt), Message("assistant", response)), f"{t.name}[{i}]")
      )
  return out


def response_nll(model: api.Model, convs: Sequence[Conversation]) -> float:
  """Per-token negative log-likelihood of the responses of `convs`, tokenized and masked as
  training tokenizes them (the run's template)."""
  examples = [
    packing.tokenize(templates.render(c, model.template), model.tokenizer, False) for c in convs
  ]
  length = max(len(e.ids) for e in examples) - 1
  tokens = np.zeros((len(examples), length + 1), np.int32)
  weights = np.zeros((len(examples), length), np.float32)
  for i, e in enumerate(examples):
    tokens[i, : len(e.ids)] = e.ids
    weights[i, : len(e.ids) - 1] = e.supervised[1:]
  logp = jax.nn.log_softmax(model.logits(tokens[:, :-1]), axis=-1)
  target = np.take_along_axis(np.asarray(logp), tokens[:, 1:, None], axis=-1)[..., 0]
  return float(-(target * weights).sum() / weights.sum())


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
    # The held-out responses' loss when asked this way, answered this way (teacher-forced).
    "nll": response_nll(model, questions(tasks, mode, n, reference=mode)),
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

  fig, axes = plt.subplots(1, 2, figsize=(12, 4))
  width = 0.38
  panels = (
    (
      axes[0],
      lambda r: 100 * r["acc"]["mean"],
      lambda r: 100 * r["acc"]["std"],
      "held-out answer accuracy (%)",
    ),
    (axes[1], lambda r: r["nll"]["mean"], lambda r: r["nll"]["std"], "held-out response loss"),
  )
  for ax, mean, std, label in panels:
    for j, (mode, color) in enumerate(zip(MODES, ("#1f77b4", "#ff7f0e"), strict=True)):
      rows = [result["arms"][a][mode] for a in ARMS]
      xs = [i + (j - 0.5) * width for i in range(len(ARMS))]
      ax.bar(
        xs,
        [mean(r) for r in rows],
        width,
        yerr=[std(r) for r in rows],
        color=color,
        capsize=3,
        label=f"asked {mode}",
      )
    ax.set_xticks(range(len(ARMS)), [f"trained on {a}" for a in ARMS])
    ax.set_ylabel(label)
    ax.legend()
  axes[0].set_ylim(0, 100)
  axes[0].set_title(
    f"embedded CoT tasks, default model, {result['steps']} steps, {result['seeds']} seeds",
    fontsize=10,
  )
  axes[1].set_title(
    "per-token loss of the answer in the asked format (lower is better)", fontsize=9
  )
  fig.tight_layout()
  fig.savefig(path, dpi=90)


def verdict(result: dict[str, Any]) -> tuple[str, str, str]:
  arms = result["arms"]

  def cell(a, m):
    return f"{100 * arms[a][m]['acc']['mean']:.0f}±{100 * arms[a][m]['acc']['std']:.0f}%"

  def nll(a, m):
    return f"{arms[a][m]['nll']['mean']:.2f}"

  ours = "; ".join(
    f"trained {a}: asked direct {cell(a, 'direct')} (loss {nll(a, 'direct')}), asked CoT "
    f"{cell(a, 'cot')} (loss {nll(a, 'cot')})"
    for a in ARMS
  )

  def parts(value, better):
    """(mixture near the best in both modes, direct-only worse than the mixture asked CoT,
    CoT-only worse than the mixture asked directly) by `value` (accuracy or loss)."""
    noise = max(abs(better) * 2 * arms[a][m][value]["std"] for a in ARMS for m in MODES) + 0.02

    def v(a, m):
      return better * arms[a][m][value]["mean"]

    return (
      all(v("mixture", m) >= max(v(a, m) for a in ARMS) - noise for m in MODES),
      v("direct", "cot") < v("mixture", "cot") - noise,
      v("cot", "direct") < v("mixture", "direct") - noise,
    )

  by_acc, by_loss = parts("acc", 1.0), parts("nll", -1.0)
  names = (
    "the mixture is as good as the best single-format arm both ways",
    "training on direct answers only hurts chain-of-thought prompting",
    "training on chain of thought only hurts direct answers",
  )
  shown = [
    f"{n}: accuracy {'yes' if a else 'no'}, loss {'yes' if b else 'no'}"
    for n, a, b in zip(names, by_acc, by_loss, strict=True)
  ]
  held = [a or b for a, b in zip(by_acc, by_loss, strict=True)]
  holds = "yes" if all(held) and all(by_acc) else "partly" if any(held) else "no"
  why = list(shown)
  if not all(by_acc):
    why.append(
      "a from-scratch model of a few hundred steps learns the formats it saw; Flan's effect is "
      "on held-out tasks (MMLU, BBH) of 8B-540B pretrained models"
    )
  return ours, holds, "; ".join(why)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = claimlib.arguments(__doc__, argv)
  commit = claimlib.commit()  # Before the runs: the code they run.
  default = config.load([], [])
  tmp = pathlib.Path(tempfile.mkdtemp(prefix="claim_flan_cot_"))
  steps = 2 if args.quick else 120
  records = 40 if args.quick else default.data.synthetic_examples  # Some tasks take 0.6 of it.
  n_eval = 2 if args.quick else 30
  quick = list(claimlib.QUICK) if args.quick else []
  train_tasks = cot_tasks(0, records)
  # Records no arm trains on; twice the questions, as some tasks take 0.6 of the records asked.
  eval_tasks = cot_tasks(4321, 2 * max(n_eval, 8))
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
    "commit": commit,
    "steps": steps,
    "seeds": args.seeds,
    "train_examples": sizes,
    "eval_questions": n_eval * len(eval_tasks),
    "tasks": [t.name for t in train_tasks],
    "arms": {
      a: {
        m: {
          "acc": claimlib.spread([r["acc"] for r in arms[a][m]]),
          "nll": claimlib.spread([r["nll"] for r in arms[a][m]]),
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
  claimlib.write(args, NAME, result)
  plot(result, args.out / f"claim_{NAME}.png")
  return result


if __name__ == "__main__":
  main()
