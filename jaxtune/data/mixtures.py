"""Flan-style task mixtures: tasks with banks of templates, mixed examples-proportionally.

A task is a list of question/answer records (with an optional `rationale` and `options`) and a
bank of templates: zero-shot, chain-of-thought (the rationale before the answer) and answer
options. Each example is rendered with a template drawn from the bank, zero-shot or few-shot
(k exemplars from the same task's training records, rendered with the same template). Tasks are
mixed in proportion to their sizes, each capped at `cap` examples (Chung et al. 2022), and
everything is drawn from the seed, so the mixture is deterministic. Held-out templates
(`eval_templates`) are never used in training.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxtune.data.formats import FLAN_COT_COLUMNS, Conversation, Message
from jaxtune.data.preference import Preference
from jaxtune.data.sources import read_records
from jaxtune.errors import DataError


@dataclasses.dataclass(frozen=True)
class TaskTemplate:
  prompt: str  # With {question} and, for option templates, {options}.
  response: str  # With {answer} and, for chain-of-thought templates, {rationale}.

  def fits(self, record: dict[str, Any]) -> bool:
    return all(
      f"{{{k}}}" not in self.prompt + self.response or record.get(k)
      for k in ("rationale", "options")
    )

  def render(self, record: dict[str, Any]) -> tuple[str, str]:
    options = "\n".join(f"- {o}" for o in record.get("options") or ())
    fields = {**record, "options": options}
    return self.prompt.format(**fields), self.response.format(**fields)


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  records: Sequence[dict[str, Any]]
  templates: tuple[TaskTemplate, ...]
  eval_templates: tuple[TaskTemplate, ...] = ()


def render_task(
  task: Task, indices: Sequence[int], rng: np.random.Generator, few_shot: int, held_out: bool
) -> list[Conversation]:
  """Conversations for `task.records[indices]`; half of them few-shot when `few_shot` > 0."""
  bank = task.eval_templates if held_out else task.templates
  out = []
  for i in indices:
    record = task.records[i]
    fitting = [t for t in bank if t.fits(record)]
    if not fitting:
      raise DataError(f"{task.name}[{i}]", "no template of the task fits this record")
    template = fitting[rng.integers(len(fitting))]
    prompt, response = template.render(record)
    if few_shot and rng.random() < 0.5:
      others = [j for j in rng.permutation(len(task.records))[: few_shot + 1] if j != i][:few_shot]
      shots = [template.render(task.records[j]) for j in others if template.fits(task.records[j])]
      prompt = "".join(f"{p}\n{r}\n\n" for p, r in shots) + prompt
    out.append(
      Conversation((Message("user", prompt), Message("assistant", response)), f"{task.name}[{i}]")
    )
  return out


def mix(
  tasks: Sequence[Task], seed: int, cap: int, few_shot: int, held_out: bool = False
) -> list[Conversation]:
  """Examples-proportional mixture: each task gives min(size, cap) examples (cap 0: no cap)."""
  rng = np.random.default_rng([seed, int(held_out)])
  out = []
  for task in tasks:
    n = len(task.records) if cap <= 0 else min(cap, len(task.records))
    out += render_task(task, rng.permutation(len(task.records))[:n], rng, few_shot, held_out)
  return out


def preference_pairs(
  tasks: Sequence[Task], seed: int, cap: int, held_out: bool = False
) -> list[Preference]:
  """Zero-shot preference pairs of a mixture: the chosen response is the record's own, the
  rejected one the same template filled with another record's answer (and rationale): a
  well-formed wrong answer. Records whose task has no other answer are left out."""
  rng = np.random.default_rng([seed, int(held_out), 1])
  out = []
  for task in tasks:
    bank = task.eval_templates if held_out else task.templates
    n = len(task.records) if cap <= 0 else min(cap, len(task.records))
    for i in rng.permutation(len(task.records))[:n]:
      record = task.records[i]
      template = bank[rng.integers(len(bank))]
      others = (task.records[j] for j in rng.permutation(len(task.records))[:8])
      wrong = [
        {**record, "answer": o["answer"], "rationale": o.get("rationale")}
        for o in others
        if o["answer"] != record["answer"]
      ]
      wrong = [w for w in wrong if template.fits(record) and template.fits(w)]
      if not wrong:
        continue
      prompt, chosen = template.render(record)
      rejected = template.render(wrong[0])[1]
      where = f"{task.name}[{i}]"
      convs = tuple(
        Conversation((Message("user", prompt), Message("assistant", r)), where)
        for r in (chosen, rejected)
      )
      out.append(Preference(convs, (0, 1), ("chosen", "rejected"), where))
  return out


# Flan-style templates for question/answer/rationale tasks (written for jaxtune).
QA_TEMPLATES = (
  TaskTemplate("{question}\nLet's think step by step.", "{rationale} So the answer is {answer}."),
  TaskTemplate("Question: {question}\nReason first, then answer.", "{rationale}\nAnswer: {answer}"),
  TaskTemplate("{question}", "{answer}"),
  TaskTemplate("Q: {question}\nA:", "{answer}"),
)
QA_EVAL_TEMPLATES = (
  TaskTemplate(
    "Answer the question below, explaining your reasoning.\n\n{question}",
    "{rationale} Therefore, the answer is {answer}.",
  ),
)


def flan_cot_tasks(folder: str) -> list[Task]:
  """One task per Flan CoT `*_train.tsv` file (question, answer, rationale) in `folder`."""
  paths = sorted(glob.glob(os.path.join(folder, "*.tsv")))
  if not paths:
    raise DataError(folder, "no .tsv files of Flan CoT tasks here")
  tasks = []
  for path in paths:
    records = [r.fields for r in read_records(path, FLAN_COT_COLUMNS)]
    name = os.path.basename(path).removesuffix(".tsv").removesuffix("_train")
    tasks.append(Task(name, records, QA_TEMPLATES, QA_EVAL_TEMPLATES))
  return tasks


def gsm8k_task(path: str) -> Task:
  """GSM8K: the worked solution is the rationale, the number after '####' the answer."""
  records = []
  for r in read_records(path):
    solution = r.fields.get("answer")
    if not isinstance(solution, str) or "####" not in solution:
      raise DataError(r.where, "field 'answer': expected a solution ending in '#### N'")
    rationale, answer = solution.rsplit("####", 1)
    records.append(
      {"question": r.fields["question"], "rationale": rationale.strip(), "answer": answer.strip()}
    )
  return Task("gsm8k", records, QA_TEMPLATES, QA_EVAL_TEMPLATES)
