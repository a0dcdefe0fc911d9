"""The reference model of DPO-style objectives: which one, never silently the policy.

`train.reference` chooses:
- `base`: under an adapter method (LoRA, prefix, prompt), the frozen base with the adapters off:
  the same base parameters through a model built without adapters. No second copy exists.
- `copy`: a frozen copy of the initial trainable parameters (under full fine-tuning, all of
  them), sharded like the policy, carried beside the frozen parameters under the key `REFERENCE`
  (`attach_copy`, called by the loop when `copies` says so).
- `precomputed`: each supervised token's reference log-probability, computed once before
  training (`train/precomputed.py`) and read from the batch; no reference model in the step.
- `auto` (the default): `base` under an adapter method, else `copy`.
An objective that finds no reference fails.
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


def copies(choice: str, model: transformer.Transformer) -> bool:
  """Whether the reference `choice` (`train.reference`) is a frozen copy of the policy."""
  if choice == "base" and model.adapters == NONE:
    raise ConfigError(
      "train.reference=base needs an adapter method (peft.method lora, prefix or prompt): "
      "under full fine-tuning the base is the policy itself; use copy or precomputed"
    )
  return choice == "copy" or (choice == "auto" and model.adapters == NONE)


def initial(model: transformer.Transformer, params: Any) -> tuple[transformer.Transformer, Any]:
  """The reference model and its parameters at the start of training (a copy's or the base's),
  from the policy's initial parameters."""
  if model.adapters == NONE:
    return model, params
  return transformer.Transformer(model.config), partition.base(params)


def split(model: transformer.Transformer, params: Any) -> tuple[Any, transformer.Transformer, Any]:
  """(the policy's parameters, the reference model, its parameters) from a step's parameters:
  a copy's (over the frozen ones it shares), else the base's."""
  if REFERENCE in params:
    policy = {k: v for k, v in params.items() if k != REFERENCE}
    return policy, model, partition.combine(params[REFERENCE], policy)
  if model.adapters == NONE:
    raise ConfigError(
      "full fine-tuning needs a frozen copy of the model as the reference, and the step has none "
      "(the loop attaches it with reference.attach_copy); the policy is never its own reference"
    )
  return params, transformer.Transformer(model.config), partition.base(params)


def without_copy(params: Any) -> Any:
  """The policy's parameters alone (for decoding after training)."""
  return {k: v for k, v in params.items() if k != REFERENCE}
