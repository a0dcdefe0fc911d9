"""PPO's programmatic rewards, and how a config names one (`ppo.reward`).

A reward is a Python callable `f(response, reference) -> float`, named `module:function` (any
importable module, so a user's own checker works too): the response is the policy's sampled text,
the reference the training conversation's answer. The two here are the tasks' own checkers:
`exact_match` for the embedded tasks (what their held-out score counts, `train/held_out.py`) and
`gsm8k_answer` for GSM8K (the final number, `data/answers.py`, as `jaxtune eval gsm8k` reads it).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from jaxtune.data import answers
from jaxtune.errors import ConfigError
from jaxtune.train import held_out

Reward = Callable[[str, str], float]


def exact_match(response: str, reference: str) -> float:
  """1 if the response is the reference up to surrounding whitespace, else 0."""
  return float(held_out.exact_match(response, reference))


def gsm8k_answer(response: str, reference: str) -> float:
  """1 if the response's final number is the reference's (GSM8K's '#### N'), else 0."""
  want = answers.final_number(reference)
  return float(bool(want) and answers.final_number(response) == want)


def named(path: str) -> Reward:
  """The callable `module:function` names; a clear error if it is not one."""
  module_name, colon, name = path.partition(":")
  if not (colon and module_name and name):
    raise ConfigError(f"ppo.reward={path!r} must be module:function")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ConfigError(f"ppo.reward={path!r}: cannot import {module_name}: {e}") from None
  fn = getattr(module, name, None)
  if not callable(fn):
    raise ConfigError(f"ppo.reward={path!r}: {module_name} has no callable {name}")
  return fn
