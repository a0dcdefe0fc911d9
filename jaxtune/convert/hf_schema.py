"""The vocabulary of a Hugging Face family's mapping (`hf_layout.FAMILIES`): a `Tensor` is one
named Hugging Face tensor and the jaxtune arrays it holds (GPT-2's fused `c_attn` holds q, k and
v), each a `View` of it: a reshape, a transpose and (Gemma's norms) an offset; constructors of the
common layouts; and the checks of config.json's fields.

Shape letters: D model dim, F mlp dim, V vocab, S positions, N query heads, K KV heads, H head dim.

Names with `{i}` are per layer: their jaxtune arrays are stacked on a leading layers axis and the
views act on one layer. PyTorch `nn.Linear` weights are [out, in]; GPT-2's `Conv1D` weights are
[in, out]. Hugging Face RoPE is rotate-half, as in jaxtune: no q/k permutation.

Views are declarative, so `View.read` can read one box of a jaxtune array (a device's shard) from
the rows of the stored tensor it covers, without reading the rest.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jaxtune.config_model import ModelConfig
from jaxtune.errors import CheckpointError

REQUIRED = object()
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")


@dataclasses.dataclass(frozen=True)
class View:
  """A jaxtune array as a view of a stored tensor: `stored.reshape(split)`, then the index
  `pick[1]` taken on axis `pick[0]` (one of GPT-2's fused q, k, v), `transpose(perm)`, and
  `+ offset` in float32 (Gemma's norms store `scale - 1`)."""

  split: tuple[int, ...]
  perm: tuple[int, ...]
  pick: tuple[int, int] | None = None
  offset: float = 0.0
  reciprocal: bool = False  # Stored as 1 / x (transformers' packed BitLinear's weight_scale).

  @property
  def kept(self) -> tuple[int, ...]:
    """The axes of `split` that remain after the pick."""
    return tuple(a for a in range(len(self.split)) if self.pick is None or a != self.pick[0])

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.split[self.kept[a]] for a in self.perm)

  def read(
    self, stored: Any, stored_shape: tuple[int, ...], index: tuple[slice, ...] | None = None
  ) -> np.ndarray:
    """The box `index` (slices of `self.shape`; None: all of it) of the jaxtune array, as numpy.

    `stored` is the stored tensor (`stored_shape`) or anything sliced like it: a safetensors
    slice, which reads only the rows asked for. Each stored axis is reshaped into a group of
    `split` axes; of a group, the run from its first axis not taken whole or at a single index
    is read. That is exactly the box when the later axes of the group are whole (a shard of the
    heads of [N*H, D], of the rows or columns of a matrix); otherwise (a sharded head_dim) the
    extra is cut away in memory.
    """
    index = index or (slice(None),) * len(self.shape)
    ranges = [range(*s.indices(n)) for s, n in zip(index, self.shape, strict=True)]
    split_ranges = [range(n) for n in self.split]
    for out_axis, r in enumerate(ranges):
      split_ranges[self.kept[self.perm[out_axis]]] = r
    if self.pick is not None:
      split_ranges[self.pick[0]] = range(self.pick[1], self.pick[1] + 1)
    stored_index, block_shape, cut = [], [], []
    for group in _groups(stored_shape, self.split):
      if not group:  # A stored axis of size 1, dropped by the reshape.
        stored_index.append(slice(None))
        continue
      rs = [split_ranges[a] for a in group]
      sizes = [self.split[a] for a in group]
      first = next((p for p, r in enumerate(rs) if len(r) != 1), len(rs) - 1)
      strides = [math.prod(sizes[p + 1 :]) for p in range(len(sizes))]
      start = sum(rs[p].start * strides[p] for p in range(first + 1))
      stored_index.append(slice(start, start + len(rs[first]) * strides[first]))
      block_shape += [1] * first + [len(rs[first])] + sizes[first + 1 :]
      cut += [slice(None)] * (first + 1) + [slice(r.start, r.stop) for r in rs[first + 1 :]]
    x = np.asarray(stored[tuple(stored_index)]).reshape(block_shape)[tuple(cut)]
    if self.pick is not None:
      x = np.squeeze(x, self.pick[0])
    x = x.transpose(self.perm)
    if self.reciprocal:
      x = np.float32(1) / x.astype(np.float32)
    return x.astype(np.float32) + np.float32(self.offset) if self.offset else x

  def unread(self, x: np.ndarray) -> np.ndarray:
    """The inverse of `read` of everything, before the reshape and the pick."""
    if self.offset:
      x = x.astype(np.float32) - np.float32(self.offset)
    if self.reciprocal:
      x = np.float32(1) / x.astype(np.float32)
    return np.transpose(x, np.argsort(self.perm))


def _groups(stored_shape: tuple[int, ...], split: tuple[int, ...]) -> list[list[int]]:
  """For each stored axis, the consecutive axes of `split` it is reshaped into."""
  groups, a = [], 0
  for n in stored_shape:
    group, size = [], 1
    while a < len(split) and (size < n or (split[a] == 1 and (group or n == 1))):
      group.append(a)
      size *= split[a]
      a += 1
    if size != n:
      raise ValueError(f"cannot reshape {stored_shape} into {split}")
    groups.append(group)
  if a != len(split):
    raise ValueError(f"cannot reshape {stored_shape} into {split}")
  return groups


@dataclasses.dataclass(frozen=True)
class Tensor:
  """A Hugging Face tensor (`name`, `shape`) and the jaxtune arrays at `paths` ('a/b/c'), each
  a `View` of it."""

  name: str
  paths: tuple[str, ...]
  shape: tuple[int, ...]
  views: tuple[View, ...]
  dtype: str | None = None  # Read as this dtype, not the parameter dtype; "uint8": stored so.

  @property
  def per_layer(self) -> bool:
    return "{i}" in self.name

  def names(self, num_layers: int) -> list[str]:
    """The stored names: one per layer, or the one."""
    return [self.name.format(i=i) for i in range(num_layers)] if self.per_layer else [self.name]

  def from_hf(self, w: np.ndarray) -> tuple[np.ndarray, ...]:
    return tuple(view.read(w, self.shape) for view in self.views)

  def to_hf(self, *arrays: np.ndarray) -> np.ndarray:
    parts = [view.unread(x) for view, x in zip(self.views, arrays, strict=True)]
    if self.views[0].pick is not None:  # The views pick 0, 1, ... of the same axis.
      return np.stack(parts, axis=self.views[0].pick[0]).reshape(self.shape)
    return parts[0].reshape(self.shape)


@dataclasses.dataclass(frozen=True)
class Family:
  """One `model_type`: its architectures (the first is written at export), the prefix of its base
  model's tensor names (absent in checkpoints of the bare base model) and its three mappings."""

  architectures: tuple[str, ...]
  prefix: str
  to_config: Callable[[Mapping[str, Any]], dict[str, Any]]  # config.json -> ModelConfig fields.
  to_hf: Callable[[ModelConfig], dict[str, Any]]  # ModelConfig -> config.json fields.
  # (ModelConfig, config.json) -> the tensors; config.json says how some are stored (BitNet).
  tensors: Callable[[ModelConfig, Mapping[str, Any]], list[Tensor]]


# Tensor layouts.


def view_tensor(name: str, path: str, shape: tuple[int, ...], split=None, perm=None, offset=0.0):
  """One jaxtune array: `shape` reshaped to `split` (default: as is), transposed by `perm`."""
  split = split or shape
  view = View(split, perm or tuple(range(len(split))), offset=offset)
  return Tensor(name, (path,), shape, (view,))


def copied(name: str, path: str, shape: tuple[int, ...]) -> Tensor:
  return view_tensor(name, path, shape)


def norm(name: str, path: str, d: int, offset: float) -> Tensor:
  """An RMSNorm weight; Gemma stores `scale - 1` (its norm multiplies by `1 + w`)."""
  return view_tensor(name, path, (d,), offset=offset)


def linear(name: str, path: str, out: int, inp: int) -> Tensor:
  """nn.Linear [out, in] <-> kernel [in, out]."""
  return view_tensor(name, path, (out, inp), perm=(1, 0))


def heads_in(name: str, path: str, n: int, h: int, d: int) -> Tensor:
  """q/k/v nn.Linear [N*H, D] <-> kernel [D, N, H]."""
  return view_tensor(name, path, (n * h, d), (n, h, d), (2, 0, 1))


def heads_out(name: str, path: str, n: int, h: int, d: int) -> Tensor:
  """o nn.Linear [D, N*H] <-> kernel [N, H, D]."""
  return view_tensor(name, path, (d, n * h), (d, n, h), (1, 2, 0))


def head_bias(name: str, path: str, n: int, h: int) -> Tensor:
  """q/k/v bias [N*H] <-> [N, H]."""
  return view_tensor(name, path, (n * h,), (n, h))


# config.json fields.


def get(hf: Mapping[str, Any], key: str, default: Any = REQUIRED) -> Any:
  if hf.get(key) is not None:
    return hf[key]
  if default is REQUIRED:
    raise CheckpointError(f"config.json has no {key!r}")
  return default


def require(hf: Mapping[str, Any], key: str, allowed: tuple[Any, ...], default: Any) -> None:
  check_value(key, get(hf, key, default), allowed)


def check_value(key: str, value: Any, allowed: tuple[Any, ...]) -> None:
  if value not in allowed:
    raise CheckpointError(
      f"config.json: {key}={value!r} has no jaxtune equivalent (supported: "
      f"{', '.join(map(repr, allowed))})"
    )
