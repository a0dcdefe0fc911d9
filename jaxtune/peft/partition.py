"""PEFT as a split of the parameters: `split(params, method) -> (trainable, frozen)`.

Gradients and optimizer state exist only for the trainable part; `combine` puts the two back
together for the forward pass. What trains, by `peft.method`:

- `none`: everything (full fine-tuning);
- `lora`: the `lora_a` / `lora_b` arrays of the adapted projections;
- `prefix` / `prompt`: the top-level `prefix` / `prompt` subtree.

Trees are nested dicts of arrays (or of shardings, or of abstract arrays: anything with the
params' structure).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

LORA_A, LORA_B = "lora_a", "lora_b"
PEFT_ROOTS = ("prefix", "prompt")  # Top-level subtrees that only PEFT methods create.


def trainable(path: tuple[str, ...], method: str) -> bool:
  """Whether the parameter at `path` trains under `method`."""
  if method == "none":
    return True
  if method == "lora":
    return path[-1] in (LORA_A, LORA_B)
  return path[0] == method


def split(params: Any, method: str) -> tuple[dict, dict]:
  """(trainable, frozen) halves of `params`; each keeps the nesting of the original."""
  halves: tuple[dict, dict] = ({}, {})
  for path, value in traverse_util.flatten_dict(params).items():
    halves[0 if trainable(path, method) else 1][path] = value
  return tuple(traverse_util.unflatten_dict(h) for h in halves)  # type: ignore[return-value]


def combine(trainable_params: Any, frozen: Any) -> dict:
  """The full tree from its two halves (the inverse of `split`)."""
  flat = traverse_util.flatten_dict(frozen)
  flat.update(traverse_util.flatten_dict(trainable_params))
  return traverse_util.unflatten_dict(flat)


def base(params: Any) -> dict:
  """`params` without any PEFT parameters: the base model's."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict(
    {p: v for p, v in flat.items() if p[0] not in PEFT_ROOTS and p[-1] not in (LORA_A, LORA_B)}
  )


def count(tree: Any) -> int:
  """Number of parameters in a (possibly abstract) tree."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def stack(adapters: Sequence[Any]) -> dict:
  """A bank of M adapters (trainable halves of the same shapes) for `adapter_ids` inference.

  Each array gains an [M] axis where the model expects it: after the [L] axis of the scanned
  layers' arrays, first elsewhere.
  """
  flats = [traverse_util.flatten_dict(a) for a in adapters]
  if any(f.keys() != flats[0].keys() for f in flats):
    raise ValueError("adapters of one bank must have the same parameters")
  bank = {}
  for path in flats[0]:
    axis = 1 if path[0] == "layers" else 0
    bank[path] = jnp.stack([f[path] for f in flats], axis=axis)
  return traverse_util.unflatten_dict(bank)
