"""MMLU (Hendrycks et al. 2021): k-shot multiple choice, scored by the log-likelihoods of the
answer letters.

Data: the original CSV layout, `DATA/dev/SUBJECT_dev.csv` (the exemplars) and
`DATA/SPLIT/SUBJECT_SPLIT.csv` (the questions), rows `question,A,B,C,D,answer` without a header.
The prompt is Hendrycks et al.'s: "The following are multiple choice questions (with answers)
about SUBJECT.", then the first k dev questions with their answers, then the question; each
exemplar and the question list the choices as "A. ..." and end in "Answer:". The prediction is
the choice whose continuation (" A", " B", ...) is most likely. k is lowered for a question whose
prompt does not fit the model, as Hendrycks et al. do. Accuracy is reported per subject and as
the macro average over subjects.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
from typing import Any

import numpy as np

from jaxtune.errors import DataError
from jaxtune.eval import base, scoring

CHOICES = ("A", "B", "C", "D")
DEFAULT_SHOTS = 5


def header(subject: str) -> str:
  """Hendrycks et al.'s first line, before the exemplars."""
  about = subject.replace("_", " ")
  return f"The following are multiple choice questions (with answers) about {about}.\n\n"


@dataclasses.dataclass(frozen=True)
class Question:
  question: str
  choices: tuple[str, ...]
  answer: str
  where: str


def read_questions(path: str) -> list[Question]:
  """The questions of one MMLU CSV file; a malformed row is a DataError naming its line."""
  try:
    with open(path, encoding="utf-8", newline="") as f:
      text = f.read()
  except OSError as e:
    raise DataError(path, f"cannot read: {e.strerror}") from None
  except UnicodeDecodeError as e:
    raise DataError(path, f"invalid UTF-8 at byte {e.start}") from None
  reader = csv.reader(io.StringIO(text))
  questions, line = [], 1
  try:
    for row in reader:
      where, line = f"{path}:{line}", reader.line_num + 1  # A quoted field may span lines.
      if not row:
        continue
      if len(row) != 6:
        raise DataError(where, f"{len(row)} columns, expected 6: question,A,B,C,D,answer")
      answer = row[5].strip()
      if answer not in CHOICES:
        raise DataError(where, f"answer {row[5]!r} is not one of {', '.join(CHOICES)}")
      if not row[0].strip():
        raise DataError(where, "empty question")
      questions.append(Question(row[0], tuple(row[1:5]), answer, where))
  except csv.Error as e:
    raise DataError(f"{path}:{line}", f"malformed CSV: {e}") from None
  if not questions:
    raise DataError(path, "no questions")
  return questions


def format_question(q: Question, with_answer: bool) -> str:
  options = "".join(f"\n{letter}. {text}" for letter, text in zip(CHOICES, q.choices, strict=True))
  return f"{q.question}{options}\nAnswer:" + (f" {q.answer}\n\n" if with_answer else "")


def subjects(folder: str, split: str) -> list[str]:
  split_dir = os.path.join(folder, split)
  if not os.path.isdir(split_dir):
    raise DataError(split_dir, f"no such folder: MMLU's {split!r} split is expected there")
  suffix = f"_{split}.csv"
  found = sorted(f.removesuffix(suffix) for f in os.listdir(split_dir) if f.endswith(suffix))
  if not found:
    raise DataError(split_dir, f"no *{suffix} files")
  return found


def run(model: Any, options: base.Options) -> base.Result:
  bench = base.Benchmark.of(options, DEFAULT_SHOTS)
  shots, template = bench.shots, bench.template
  names = base.chosen(subjects(options.data, options.split), options, "MMLU subject")
  continuations = [model.tokenizer.encode(f" {letter}") for letter in CHOICES]
  room = max(map(len, continuations)) - 1
  prompts, questions, subject_of = [], [], []
  for subject in names:
    dev_path = os.path.join(options.data, "dev", f"{subject}_dev.csv")
    dev = read_questions(dev_path)
    if len(dev) < shots:
      raise DataError(dev_path, f"{len(dev)} exemplars, fewer than the {shots} shots asked for")
    head = header(subject)
    exemplars = [format_question(q, True) for q in dev[:shots]]
    path = os.path.join(options.data, options.split, f"{subject}_{options.split}.csv")
    for q in base.limited(read_questions(path), options.limit):
      prompts.append(
        base.few_shot(model, template, head, exemplars, format_question(q, False), room)
      )
      questions.append(q)
      subject_of.append(subject)
  requests = [(p.ids, c) for p in prompts for c in continuations]
  scores_qc = scoring.loglikelihoods(model, requests, options.batch_size).reshape(-1, len(CHOICES))
  predicted = [CHOICES[i] for i in np.argmax(scores_qc, axis=1)]
  groups: dict[str, dict[str, float]] = {}
  examples = []
  for q, subject, prompt, guess, scores in zip(
    questions, subject_of, prompts, predicted, scores_qc, strict=True
  ):
    group = groups.setdefault(subject, {"questions": 0, "correct": 0})
    group["questions"] += 1
    group["correct"] += guess == q.answer
    examples.append(
      {
        "where": q.where,
        "subject": subject,
        "shots": prompt.shots,
        "loglikelihoods": dict(zip(CHOICES, scores.tolist(), strict=True)),
        "predicted": guess,
        "answer": q.answer,
      }
    )
  for group in groups.values():
    group["accuracy"] = group["correct"] / group["questions"]
  metrics = {
    "accuracy_macro": float(np.mean([g["accuracy"] for g in groups.values()])),
    "accuracy_micro": sum(g["correct"] for g in groups.values()) / len(questions),
    "questions": len(questions),
    "subjects": len(groups),
    "shots": shots,
    **base.report_fit(prompts, shots, model.config.max_seq_len),
  }
  return base.Result("mmlu", metrics, groups, examples)
