"""The reference model of DPO-style objectives: which one, never silently the policy.

- Under an adapter method (LoRA, prefix, prompt) it is the frozen base with the adapters off: the
  same base parameters through a model built without adapters. No second copy exists.
- Under full fine-tuning it is a frozen copy of the initial parameters, sharded like the policy,
  carried beside the frozen parameters under the key `REFERENCE` (`attach_copy`, called by the
  loop when an objective `needs_reference`). An objective that finds neither fails.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxtune.errors import ConfigError
from jaxtune.model import transformer
from jaxtune.model.adapters import NONE
from jaxtune.peft import partition

REFERENCE = "reference"  # Full fine-tuning's frozen copy, among the frozen parameters.


def attach_copy(
  trainable: Any, trainable_sharding: Any, frozen: dict, frozen_sharding: dict, abstract: bool
) -> tuple[dict, dict]:
  """Frozen parameters and their shardings with a copy of `trainable` (sharded as it is) under
  `REFERENCE`. A real copy: the training state's parameters are donated to the step."""
  if abstract:
    copy = trainable
  else:
    copy = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=trainable_sharding)(trainable)
  return {**frozen, REFERENCE: copy}, {**frozen_sharding, REFERENCE: trainable_sharding}


def split(model: transformer.Transformer, params: Any) -> tuple[Any, transformer.Transformer, Any]:
  """(the policy's parameters, the reference model, its parameters) from a step's parameters."""
  if REFERENCE in params:
    policy = {k: v for k, v in params.items() if k != REFERENCE}
    return policy, model, params[REFERENCE]
  if model.adapters == NONE:
    raise ConfigError(
      "full fine-tuning needs a frozen copy of the model as the reference, and the step has none "
      "(the loop attaches it with reference.attach_copy); the policy is never its own reference"
    )
  return params, transformer.Transformer(model.config), partition.base(params)


def without_copy(params: Any) -> Any:
  """The policy's parameters alone (for decoding after training)."""
  return {k: v for k, v in params.items() if k != REFERENCE}
