"""GSM8K (Cobbe et al. 2021): k-shot chain-of-thought generation, answer extraction, exact match.

Data: JSONL records `{"question", "answer"}` whose answer ends in "#### N" (the test file to
score, and the train file for `--exemplars`, whose first k records are the exemplars). Prompt:
"Question: ...\\nAnswer: <worked solution>\\n\\n" per exemplar (the solution without its
calculator annotations "<<48/2=24>>"), then "Question: ...\\nAnswer:". Greedy decoding stops at a
blank line or at "Question:". The predicted answer is the number after "####", else after "the
answer is", else the last number in the output; it is correct if it equals the reference number
("1,000" = "1000", "5.0" = "5").
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from jaxtune.data import answers
from jaxtune.data.sources import read_records
from jaxtune.errors import DataError
from jaxtune.eval import base

DEFAULT_SHOTS = 8
STOP = ("\n\n", "Question:")


@dataclasses.dataclass(frozen=True)
class Problem:
  question: str
  solution: str  # The worked solution, without calculator annotations or the final line.
  answer: str  # Normalized.
  where: str


def read_problems(path: str) -> list[Problem]:
  """GSM8K records; a missing field or final answer is a DataError naming file and line."""
  problems = []
  for record in read_records(path):
    fields = {}
    for key in ("question", "answer"):
      value = record.fields.get(key)
      if not isinstance(value, str) or not value.strip():
        raise DataError(record.where, f"field {key!r}: missing, empty or not a string")
      fields[key] = value
    solution, sep, final = fields["answer"].rpartition("####")
    if not sep or not final.strip():
      raise DataError(record.where, "field 'answer': no final answer '#### N'")
    solution = re.sub(r"<<[^>]*>>", "", solution).strip()
    problems.append(
      Problem(fields["question"].strip(), solution, answers.normalize_number(final), record.where)
    )
  if not problems:
    raise DataError(path, "no records")
  return problems


def exemplar(p: Problem) -> str:
  return f"Question: {p.question}\nAnswer: {p.solution}\n#### {p.answer}\n\n"


def run(model: Any, options: base.Options) -> base.Result:
  bench = base.Benchmark.of(options, DEFAULT_SHOTS)
  shots, template = bench.shots, bench.template
  if shots and not options.exemplars:
    raise DataError("--exemplars", f"{shots}-shot GSM8K needs a file of exemplars (train.jsonl)")
  exemplars = read_problems(options.exemplars)[:shots] if shots else []
  if len(exemplars) < shots:
    raise DataError(options.exemplars, f"{len(exemplars)} exemplars, fewer than {shots} shots")
  problems = base.limited(read_problems(options.data), options.limit)
  texts = [exemplar(p) for p in exemplars]
  prompts = [
    base.few_shot(
      model, template, "", texts, f"Question: {p.question}\nAnswer:", options.max_new_tokens - 1
    )
    for p in problems
  ]
  outputs = base.complete(model, [p.ids for p in prompts], options, template, STOP)
  examples = []
  for p, prompt, output in zip(problems, prompts, outputs, strict=True):
    predicted = answers.final_number(output)
    examples.append(
      {
        "where": p.where,
        "shots": prompt.shots,
        "output": output,
        "predicted": predicted,
        "answer": p.answer,
        "correct": predicted == p.answer,
      }
    )
  correct = sum(e["correct"] for e in examples)
  result_metrics = {
    "exact_match": correct / len(examples),
    "questions": len(examples),
    "shots": shots,
    **base.report_fit(prompts, shots, model.config.max_seq_len),
  }
  return base.Result("gsm8k", result_metrics, {}, examples)
