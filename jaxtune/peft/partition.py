"""PEFT as a split of the parameters: `split(params, trains) -> (trainable, frozen)`.

Gradients and optimizer state exist only for the trainable part; `combine` puts the two back
together for the forward pass. Which parameters train is a predicate on their paths (a PEFT
method's: `peft/methods.py`).

Trees are nested dicts of arrays (or of shardings, or of abstract arrays: anything with the
params' structure).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxtune.model.adapters import is_adapter

Predicate = Callable[[tuple[str, ...]], bool]  # A parameter's path -> whether it is chosen.


def split(params: Any, trains: Predicate) -> tuple[dict, dict]:
  """(the parameters `trains` chooses, the rest); each keeps the nesting of the original."""
  halves: tuple[dict, dict] = ({}, {})
  for path, value in traverse_util.flatten_dict(params).items():
    halves[0 if trains(path) else 1][path] = value
  return tuple(traverse_util.unflatten_dict(h) for h in halves)  # type: ignore[return-value]


def combine(trainable_params: Any, frozen: Any) -> dict:
  """The full tree from its two halves (the inverse of `split`)."""
  flat = traverse_util.flatten_dict(frozen)
  flat.update(traverse_util.flatten_dict(trainable_params))
  return traverse_util.unflatten_dict(flat)


def base(params: Any) -> dict:
  """`params` without any adapter parameters: the base model's."""
  return split(params, is_adapter)[1]


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
