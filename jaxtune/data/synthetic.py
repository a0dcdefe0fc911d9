"""The embedded default dataset: a Flan-style mixture of small tasks the package generates itself.

No downloads: arithmetic with worked steps, string transformations, counting and sorting, each a
task with its own template bank (zero-shot, chain-of-thought, answer options) and a held-out
template used only for evaluation (new wording of the prompt, answered in a trained format).
Answers are short and exactly learnable, so a small model on a CPU learns them in minutes and a
falling held-out loss means real learning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from jaxtune.data.mixtures import Task, TaskTemplate

_WORDS = (
  "apple river stone cloud garden window purple rocket silver candle forest planet mirror "
  "ladder pencil orange summer winter button castle dragon marble pepper rabbit tunnel honey "
  "jacket lemon meadow night ocean pillow quiet robin shadow tiger violet wagon yellow zebra"
).split()


def _add(rng: np.random.Generator) -> dict[str, Any]:
  a, b = (int(x) for x in rng.integers(10, 100, 2))
  tens, ones = (a // 10 + b // 10) * 10, a % 10 + b % 10
  rationale = (
    f"{a} + {b} = {a // 10 * 10} + {b // 10 * 10} + {a % 10} + {b % 10} = {tens} + {ones}."
  )
  wrong = sorted({a + b, a + b + 10, a + b - 1, abs(a - b)})
  return {
    "question": f"What is {a} plus {b}?",
    "answer": str(a + b),
    "rationale": rationale,
    "options": [str(x) for x in wrong],
  }


def _reverse(rng: np.random.Generator) -> dict[str, Any]:
  word = _WORDS[rng.integers(len(_WORDS))]
  return {
    "question": f"Reverse the letters of the word '{word}'.",
    "answer": word[::-1],
    "rationale": f"The letters are {' '.join(word)}; backwards they are {' '.join(word[::-1])}.",
  }


def _capitals(rng: np.random.Generator) -> dict[str, Any]:
  words = [_WORDS[i] for i in rng.integers(len(_WORDS), size=rng.integers(1, 4))]
  text = " ".join(words)
  return {"question": f"Write '{text}' in capital letters.", "answer": text.upper()}


def _count(rng: np.random.Generator) -> dict[str, Any]:
  word = _WORDS[rng.integers(len(_WORDS))]
  spelled = ", ".join(f"{i} {c}" for i, c in enumerate(word, 1))
  n = len(word)
  return {
    "question": f"How many letters does '{word}' have?",
    "answer": str(n),
    "rationale": f"Counting them: {spelled}.",
    "options": [str(x) for x in range(n - 2, n + 2)],
  }


def _sort(rng: np.random.Generator) -> dict[str, Any]:
  digits = [int(x) for x in rng.integers(0, 10, rng.integers(3, 7))]
  return {
    "question": f"Sort these numbers from smallest to largest: {', '.join(map(str, digits))}.",
    "answer": ", ".join(map(str, sorted(digits))),
  }


_T = TaskTemplate
_COT = "{rationale} So the answer is {answer}."
# Openings of trained prompts, drawn per record: one to three of these words and a stop. None of
# the held-out openings' words is here ("Please do this.", "Compute the sum.", "Spell backwards.",
# "Letter count."): those words are never trained on, and the tokenizer, trained on the training
# text, splits them into letters. With three fixed openings only, "Please do this." halved
# capitals (8 of 16 held-out prompts right; the same prompts without it: 16 of 16).
_OPENING_WORDS = (
  "now here next one more question answer solve look try quick simple kindly below following "
  "item problem exercise your turn go ahead again another easy short today okay good luck ready "
  "begin start check note hello there friend listen consider request puzzle example a an is of "
  "for me you we let us see first then very small fine"
).split()
_STOPS = (".", "!", ":")


def _opening(rng: np.random.Generator) -> str:
  words = [_OPENING_WORDS[i] for i in rng.integers(len(_OPENING_WORDS), size=rng.integers(1, 4))]
  return " ".join(words).capitalize() + _STOPS[rng.integers(len(_STOPS))]


# Wordings every task is trained in (Flan's lesson in miniature: many phrasings of one task make
# a model answer phrasings it never saw). None of them begins as a held-out template does; four
# open with a sentence of their own (one drawn per record), so that a model learns to read past
# an opening it has not seen (in a run trained on only the first four, "Please do this." turned
# capitals prompts into reversals).
_WORDINGS = (
  _T("{question}", "{answer}"),
  _T("Task: {question}\nResult:", "{answer}"),
  _T("Q: {question}\nA:", "{answer}"),
  _T("Here is a question. {question}", "{answer}"),
  _T("Read carefully. {question}", "{answer}"),
  _T("New task! {question}", "{answer}"),
  _T("Instruction: {question}", "{answer}"),
  _T("{opening} {question}", "{answer}"),
)
_OPTIONS = _T("{question}\nOptions:\n{options}", "{answer}")


def _worked(instruction: str) -> tuple[TaskTemplate, ...]:
  """Every trained wording asking for a worked answer: `instruction` follows the question."""
  return tuple(
    _T(t.prompt.replace("{question}", f"{{question}} {instruction}"), _COT) for t in _WORDINGS
  )


@dataclasses.dataclass(frozen=True)
class _Spec:
  make: Callable[[np.random.Generator], dict[str, Any]]
  templates: tuple[TaskTemplate, ...]
  # New wordings (an instruction never trained on) of a trained request, used only to evaluate:
  # the answer's form is the one the same request is trained to give (a worked answer only where
  # the prompt asks for one).
  held_out: tuple[TaskTemplate, ...]
  # Records relative to `examples_per_task`. Reverse and counting (lookups over 40 words, every
  # held-out prompt right from 2,000 records) and arithmetic (the longest answers) take fewer,
  # sorting (ordering a multiset, the slowest learned) more: of the mixture's tokens, arithmetic
  # has 19%, reverse 10%, capitals 16%, counting 11%, sorting 44%.
  share: float = 1.0


_TASKS: dict[str, _Spec] = {
  # Worked answers in every wording, as the held-out prompt asks for one (with the worked form in
  # a single wording, a held-out opening sentence turned it into a bare, wrong sum).
  "arithmetic": _Spec(
    _add,
    (*_WORDINGS, *_worked("Show your work."), _OPTIONS),
    (_T("Compute the sum. {question} Show your work.", _COT),),
    share=0.6,
  ),
  "reverse": _Spec(
    _reverse,
    (*_WORDINGS, _T("{question} Think step by step.", _COT)),
    (_T("Spell backwards. {question}", "{answer}"),),
    share=0.6,
  ),
  "capitals": _Spec(_capitals, _WORDINGS, (_T("Please do this. {question}", "{answer}"),)),
  "counting": _Spec(
    _count,
    (*_WORDINGS, _T("{question} Count one by one.", _COT), _OPTIONS),
    (_T("Letter count. {question}", "{answer}"),),
    share=0.6,
  ),
  "sorting": _Spec(_sort, _WORDINGS, (_T("Please do this. {question}", "{answer}"),), share=1.4),
}


def tasks(seed: int, examples_per_task: int) -> list[Task]:
  """The embedded tasks, `examples_per_task` records times the task's share each, generated
  from `seed`."""
  out = []
  for i, (name, spec) in enumerate(_TASKS.items()):
    rng = np.random.default_rng([seed, i])
    records = [spec.make(rng) for _ in range(max(round(examples_per_task * spec.share), 1))]
    openings = np.random.default_rng([seed, i, 1])  # Apart: the records do not depend on it.
    records = [{**r, "opening": _opening(openings)} for r in records]
    out.append(Task(name, records, spec.templates, spec.held_out))
  return out
