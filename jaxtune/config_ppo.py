"""The `ppo` section: PPO-ptx's rollouts, reward, KL penalty and optimization (`train/ppo.py`,
`train/ppo_run.py`), read when `train.objective` is `ppo`.

A frozen dataclass like those of `config.py`, kept apart from it (one section, one concern).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from jaxtune.config_values import check as _check


@dataclasses.dataclass(frozen=True)
class PpoConfig:
  """InstructGPT's PPO-ptx (Ouyang et al. 2022). Each iteration samples `rollouts` responses to
  training prompts, scores them, then runs `epochs` passes of minibatches of `train.batch_size`
  rollouts; `train.steps` counts those updates (a whole number of iterations)."""

  rollouts: int = 32  # Prompts sampled per iteration (a multiple of train.batch_size).
  epochs: int = 4  # Passes over each iteration's rollouts.
  max_new_tokens: int = 32
  temperature: float = 1.0
  top_k: int = 0
  # A Python callable `module:function(response, reference) -> float` (`train/rewards.py`), or
  # "" with `reward_model`.
  reward: str = "jaxtune.train.rewards:exact_match"
  reward_model: str = ""  # A reward run (`train.objective=reward`); its head starts the value's.
  kl_coef: float = 0.02  # beta: the per-token KL penalty's weight (InstructGPT: 0.02).
  # k1: -beta (log pi - log ref) added to each token's reward (InstructGPT's); k3: beta times
  # the k3 estimator exp(ref - pi) - (ref - pi) - 1 added to the loss instead.
  kl: Literal["k1", "k3"] = "k1"
  adaptive_kl: bool = False  # Ziegler et al. 2019's controller (k1 only).
  kl_target: float = 6.0  # The controller's target KL per response (nats).
  kl_horizon: int = 10000  # The controller's horizon, in rollouts.
  gamma: float = 1.0  # GAE's discount.
  lam: float = 0.95  # GAE's lambda.
  clip: float = 0.2  # The policy ratio's clip range.
  value_clip: float = 0.2  # The value's clip range around the rollout's value.
  value_coef: float = 0.5  # The value loss's weight.
  whiten: bool = True  # Advantages to mean 0, variance 1 over each iteration's tokens.
  ptx_coef: float = 0.0  # gamma of PPO-ptx: the weight of the LM loss on the data's batches.

  def validate(self) -> None:
    for key in ("rollouts", "epochs", "max_new_tokens", "kl_horizon"):
      _check(getattr(self, key) > 0, f"ppo.{key}={getattr(self, key)} must be positive")
    for key in ("temperature", "top_k", "kl_coef", "kl_target", "value_coef", "ptx_coef"):
      _check(getattr(self, key) >= 0, f"ppo.{key}={getattr(self, key)} must not be negative")
    for key in ("gamma", "lam"):
      _check(0 <= getattr(self, key) <= 1, f"ppo.{key}={getattr(self, key)} must be in [0, 1]")
    for key in ("clip", "value_clip"):
      _check(getattr(self, key) > 0, f"ppo.{key}={getattr(self, key)} must be positive")
    _check(
      bool(self.reward) != bool(self.reward_model),
      "ppo.reward (a Python callable) and ppo.reward_model (a reward run): set exactly one",
    )
    _check(
      not (self.adaptive_kl and self.kl == "k3"),
      "ppo.adaptive_kl needs ppo.kl=k1 (the controller sets the reward's penalty)",
    )
