"""Multiple choice by log-likelihood, as GPT-3 (Brown et al. 2020, Section 2.4) and
lm-evaluation-harness score it: the predicted choice maximizes

- `acc`: log p(choice | context);
- `acc_norm`: that, divided by the choice's length in characters (the harness's `acc_norm`) or
  in tokens (GPT-3's per-token normalization);
- `acc_mutual_info`: log p(choice | context) - log p(choice | unconditional context), GPT-3's
  normalization by the unconditional probability of the answer (the harness's unconditional
  context is the empty string, so the choice follows BOS alone; GPT-3 used "Answer:" for some
  tasks; a task may give either).

The harness counts characters of the continuation as sent (with its leading target delimiter).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

NORMS = ("chars", "tokens")


@dataclasses.dataclass(frozen=True)
class Question:
  """One question's scores: per choice, log p(choice | context) and its lengths; `unconditional`:
  log p(choice | unconditional context), if asked for."""

  logprob: np.ndarray  # [C]
  chars: np.ndarray  # [C]
  tokens: np.ndarray  # [C]
  answer: int
  unconditional: np.ndarray | None = None  # [C]


def _acc(q: Question) -> np.ndarray:
  return q.logprob


def _acc_norm_chars(q: Question) -> np.ndarray:
  return q.logprob / q.chars


def _acc_norm_tokens(q: Question) -> np.ndarray:
  return q.logprob / q.tokens


def _acc_mutual_info(q: Question) -> np.ndarray:
  if q.unconditional is None:
    raise ValueError("acc_mutual_info needs the choices' unconditional log-likelihoods")
  return q.logprob - q.unconditional


# Metric -> the per-choice score whose argmax is the prediction.
METRICS: dict[str, Callable[[Question], np.ndarray]] = {
  "acc": _acc,
  "acc_norm": _acc_norm_chars,
  "acc_norm_tokens": _acc_norm_tokens,
  "acc_mutual_info": _acc_mutual_info,
}


def predict(q: Question, metric: str) -> int:
  """The choice `metric` picks (the first of equals, as numpy's argmax)."""
  if metric not in METRICS:
    raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
  return int(np.argmax(METRICS[metric](q)))


def accuracy(questions: Sequence[Question], metric: str) -> float:
  """The fraction of `questions` whose prediction under `metric` is the answer."""
  if not questions:
    raise ValueError("no questions")
  return float(np.mean([predict(q, metric) == q.answer for q in questions]))
