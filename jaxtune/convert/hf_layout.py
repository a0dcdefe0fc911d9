"""Hugging Face model families (Llama, Mistral, Qwen2, Gemma, GPT-2, BitNet): config.json <->
ModelConfig, and each tensor's name and layout.

Shape letters: D model dim, F mlp dim, V vocab, S positions, N query heads, K KV heads, H head dim.

A `Tensor` is one named Hugging Face tensor and the jaxtune arrays it holds (GPT-2's fused `c_attn`
holds q, k and v), each a `View` of it: a reshape, a transpose and (Gemma's norms) an offset.
Names with `{i}` are per layer: their jaxtune arrays are stacked on a leading layers axis and the
views act on one layer. PyTorch `nn.Linear` weights are [out, in]; GPT-2's `Conv1D` weights are
[in, out]. Hugging Face RoPE is rotate-half, as in jaxtune: no q/k permutation.

Views are declarative, so `View.read` can read one box of a jaxtune array (a device's shard) from
the rows of the stored tensor it covers, without reading the rest.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jaxtune.config import ModelConfig
from jaxtune.errors import CheckpointError

logger = logging.getLogger(__name__)

_REQUIRED = object()
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")
# Fields that do not change the function the model computes.
_NOT_ARCHITECTURE = (
  "preset",
  "dtype",
  "param_dtype",
  "remat",
  "residual_dropout",
  "residual_dropout_schedule",
)


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


def _view(name: str, path: str, shape: tuple[int, ...], split=None, perm=None, offset=0.0):
  """One jaxtune array: `shape` reshaped to `split` (default: as is), transposed by `perm`."""
  split = split or shape
  view = View(split, perm or tuple(range(len(split))), offset=offset)
  return Tensor(name, (path,), shape, (view,))


def _copy(name: str, path: str, shape: tuple[int, ...]) -> Tensor:
  return _view(name, path, shape)


def _norm(name: str, path: str, d: int, offset: float) -> Tensor:
  """An RMSNorm weight; Gemma stores `scale - 1` (its norm multiplies by `1 + w`)."""
  return _view(name, path, (d,), offset=offset)


def _linear(name: str, path: str, out: int, inp: int) -> Tensor:
  """nn.Linear [out, in] <-> kernel [in, out]."""
  return _view(name, path, (out, inp), perm=(1, 0))


def _heads_in(name: str, path: str, n: int, h: int, d: int) -> Tensor:
  """q/k/v nn.Linear [N*H, D] <-> kernel [D, N, H]."""
  return _view(name, path, (n * h, d), (n, h, d), (2, 0, 1))


def _heads_out(name: str, path: str, n: int, h: int, d: int) -> Tensor:
  """o nn.Linear [D, N*H] <-> kernel [N, H, D]."""
  return _view(name, path, (d, n * h), (d, n, h), (1, 2, 0))


def _head_bias(name: str, path: str, n: int, h: int) -> Tensor:
  """q/k/v bias [N*H] <-> [N, H]."""
  return _view(name, path, (n * h,), (n, h))


def _fused_qkv(name: str, kind: str, n: int, h: int, d: int) -> Tensor:
  """GPT-2 `c_attn`: Conv1D weight [D, 3*N*H] or bias [3*N*H] <-> q, k, v [D, N, H] or [N, H]."""
  lead = (d,) if kind == "kernel" else ()
  split = (*lead, 3, n, h)
  return Tensor(
    name,
    tuple(f"layers/attn/{x}/{kind}" for x in "qkv"),
    (*lead, 3 * n * h),
    tuple(View(split, tuple(range(len(split) - 1)), pick=(len(lead), j)) for j in range(3)),
  )


def _decoder_tensors(
  cfg: ModelConfig, hf: Mapping[str, Any] | None = None, norm_offset: float = 0.0
) -> list[Tensor]:
  """Llama, Mistral, Qwen2 and Gemma: `model.layers.{i}.*`, RMSNorms, an optional `lm_head`."""
  d, f, v = cfg.dim, cfg.mlp_dim, cfg.vocab_size
  n, k, h = cfg.num_heads, cfg.kv_heads, cfg.head_size
  attn, mlp = "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
  tensors = [
    _copy("model.embed_tokens.weight", "embed/embedding", (v, d)),
    _norm("model.layers.{i}.input_layernorm.weight", "layers/attn_norm/scale", d, norm_offset),
    _heads_in(attn + "q_proj.weight", "layers/attn/q/kernel", n, h, d),
    _heads_in(attn + "k_proj.weight", "layers/attn/k/kernel", k, h, d),
    _heads_in(attn + "v_proj.weight", "layers/attn/v/kernel", k, h, d),
    _heads_out(attn + "o_proj.weight", "layers/attn/o/kernel", n, h, d),
    _norm(
      "model.layers.{i}.post_attention_layernorm.weight", "layers/mlp_norm/scale", d, norm_offset
    ),
    _linear(mlp + "gate_proj.weight", "layers/mlp/gate/kernel", f, d),
    _linear(mlp + "up_proj.weight", "layers/mlp/up/kernel", f, d),
    _linear(mlp + "down_proj.weight", "layers/mlp/down/kernel", d, f),
    _norm("model.norm.weight", "final_norm/scale", d, norm_offset),
  ]
  if cfg.qkv_bias:
    for x, heads in (("q", n), ("k", k), ("v", k)):
      tensors.append(_head_bias(attn + f"{x}_proj.bias", f"layers/attn/{x}/bias", heads, h))
  if not cfg.tie_embeddings:
    tensors.append(_copy("lm_head.weight", "lm_head/embedding", (v, d)))
  return tensors


def _gpt2_tensors(cfg: ModelConfig, hf: Mapping[str, Any] | None = None) -> list[Tensor]:
  d, f, v, p = cfg.dim, cfg.mlp_dim, cfg.vocab_size, cfg.max_seq_len
  n, h = cfg.num_heads, cfg.head_size
  block = "transformer.h.{i}."
  tensors = [
    _copy("transformer.wte.weight", "embed/embedding", (v, d)),
    _copy("transformer.wpe.weight", "position/embedding", (p, d)),
    _fused_qkv(block + "attn.c_attn.weight", "kernel", n, h, d),
    _fused_qkv(block + "attn.c_attn.bias", "bias", n, h, d),
    _view(block + "attn.c_proj.weight", "layers/attn/o/kernel", (n * h, d), (n, h, d)),
    _copy(block + "attn.c_proj.bias", "layers/attn/o/bias", (d,)),
    _copy(block + "mlp.c_fc.weight", "layers/mlp/up/kernel", (d, f)),
    _copy(block + "mlp.c_fc.bias", "layers/mlp/up/bias", (f,)),
    _copy(block + "mlp.c_proj.weight", "layers/mlp/down/kernel", (f, d)),
    _copy(block + "mlp.c_proj.bias", "layers/mlp/down/bias", (d,)),
  ]
  for hf_name, ours in (
    (block + "ln_1", "layers/attn_norm"),
    (block + "ln_2", "layers/mlp_norm"),
    ("transformer.ln_f", "final_norm"),
  ):
    tensors.append(_copy(hf_name + ".weight", ours + "/scale", (d,)))
    tensors.append(_copy(hf_name + ".bias", ours + "/bias", (d,)))
  if not cfg.tie_embeddings:
    tensors.append(_copy("lm_head.weight", "lm_head/embedding", (v, d)))
  return tensors


def _packed(name: str, path: str, out: int, inp: int, reciprocal: bool) -> list[Tensor]:
  """A packed BitNet nn.Linear: uint8 weight [out / 4, in] and weight_scale [1] <-> the packed
  projection's `packed` and `scale` (see `model/packed.py`, which stores them in this layout)."""
  rows = (out // 4, inp)
  return [
    Tensor(name, (f"{path}/packed",), rows, (View(rows, (0, 1)),), dtype="uint8"),
    Tensor(
      name + "_scale",
      (f"{path}/scale",),
      (1,),
      (View((1,), (0,), reciprocal=reciprocal),),
      "float32",
    ),
  ]


def _bitnet_tensors(cfg: ModelConfig, hf: Mapping[str, Any] | None = None) -> list[Tensor]:
  """BitNet: Llama's tensors, the sub-norms, and with packed weights (`bitnet158_packed`) each
  projection as `weight` (uint8) and `weight_scale`, which transformers' `BitLinear` divides by
  and `AutoBitLinear` multiplies by (jaxtune's scale multiplies)."""
  d, f, n, k, h = cfg.dim, cfg.mlp_dim, cfg.num_heads, cfg.kv_heads, cfg.head_size
  attn, mlp = "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
  tensors = _decoder_tensors(cfg) + [
    _view(attn + "attn_sub_norm.weight", "layers/attn/sub_norm/scale", (n * h,), (n, h)),
    _norm(mlp + "ffn_sub_norm.weight", "layers/mlp/sub_norm/scale", f, 0.0),
  ]
  if cfg.linear != "bitnet158_packed":
    return tensors
  quant = (hf or {}).get("quantization_config") or {}
  reciprocal = quant.get("linear_class", "bitlinear") == "bitlinear"
  projections = {
    attn + "q_proj.weight": ("layers/attn/q", n * h, d),
    attn + "k_proj.weight": ("layers/attn/k", k * h, d),
    attn + "v_proj.weight": ("layers/attn/v", k * h, d),
    attn + "o_proj.weight": ("layers/attn/o", d, n * h),
    mlp + "gate_proj.weight": ("layers/mlp/gate", f, d),
    mlp + "up_proj.weight": ("layers/mlp/up", f, d),
    mlp + "down_proj.weight": ("layers/mlp/down", d, f),
  }
  tensors = [t for t in tensors if t.name not in projections]
  for name, (path, out, inp) in projections.items():
    tensors += _packed(name, path, out, inp, reciprocal)
  return tensors


# config.json <-> ModelConfig.


def _get(hf: Mapping[str, Any], key: str, default: Any = _REQUIRED) -> Any:
  if hf.get(key) is not None:
    return hf[key]
  if default is _REQUIRED:
    raise CheckpointError(f"config.json has no {key!r}")
  return default


def _require(hf: Mapping[str, Any], key: str, allowed: tuple[Any, ...], default: Any) -> None:
  _check_value(key, _get(hf, key, default), allowed)


def _check_value(key: str, value: Any, allowed: tuple[Any, ...]) -> None:
  if value not in allowed:
    raise CheckpointError(
      f"config.json: {key}={value!r} has no jaxtune equivalent (supported: "
      f"{', '.join(map(repr, allowed))})"
    )


def _rope_theta(hf: Mapping[str, Any]) -> float:
  """`rope_theta`, top-level (transformers 4) or in `rope_parameters` (5); no RoPE scaling."""
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind != "default":
    raise CheckpointError(f"config.json: RoPE scaling {kind!r} is not supported")
  if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
    raise CheckpointError("config.json: partial rotary embeddings are not supported")
  return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _decoder_config(hf: Mapping[str, Any], tie_default: bool) -> dict[str, Any]:
  """The fields shared by Llama, Mistral, Qwen2 and Gemma."""
  dim, heads = _get(hf, "hidden_size"), _get(hf, "num_attention_heads")
  kv_heads = _get(hf, "num_key_value_heads", heads)
  head_dim = _get(hf, "head_dim", dim // heads)
  max_len = _get(hf, "max_position_embeddings")
  window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
  if window is not None and window < max_len:
    logger.warning(
      "sliding-window attention (%d tokens) is not implemented: the model is exact up to %d "
      "tokens, so max_seq_len is set to %d instead of %d",
      window,
      window,
      window,
      max_len,
    )
    max_len = window
  return dict(
    vocab_size=_get(hf, "vocab_size"),
    dim=dim,
    num_layers=_get(hf, "num_hidden_layers"),
    num_heads=heads,
    num_kv_heads=None if kv_heads == heads else kv_heads,
    head_dim=None if head_dim * heads == dim else head_dim,
    mlp_dim=_get(hf, "intermediate_size"),
    norm="rmsnorm",
    norm_eps=float(_get(hf, "rms_norm_eps", 1e-6)),  # The default of all four families.
    position="rope",
    rope_theta=_rope_theta(hf),
    max_seq_len=max_len,
    tie_embeddings=bool(_get(hf, "tie_word_embeddings", tie_default)),
  )


def _llama_config(hf: Mapping[str, Any]) -> dict[str, Any]:
  _require(hf, "hidden_act", ("silu",), "silu")
  _require(hf, "attention_bias", (False,), False)
  _require(hf, "mlp_bias", (False,), False)
  return _decoder_config(hf, tie_default=False) | dict(mlp="swiglu")


def _qwen2_config(hf: Mapping[str, Any]) -> dict[str, Any]:
  return _llama_config(hf) | dict(qkv_bias=True)


def _gemma_config(hf: Mapping[str, Any]) -> dict[str, Any]:
  # Gemma's legacy `hidden_act="gelu"` means the tanh approximation (as in transformers).
  act = hf.get("hidden_activation") or _get(hf, "hidden_act", "gelu_pytorch_tanh")
  _check_value("hidden_act", act, ("gelu", *_TANH_GELUS))
  _require(hf, "attention_bias", (False,), False)
  return _decoder_config(hf, tie_default=True) | dict(mlp="geglu", scale_embeddings=True)


# transformers' BitNet quantization_config (linear_class, quantization_mode) -> model.linear.
# `BitLinear` always reads packed weights; `AutoBitLinear` quantizes float weights online or
# reads packed ones offline. No quantization_config: plain nn.Linear layers.
_BITNET_LINEAR = {
  ("autobitlinear", "online"): "bitnet158",
  ("autobitlinear", "offline"): "bitnet158_packed",
  ("bitlinear", "online"): "bitnet158_packed",
  ("bitlinear", "offline"): "bitnet158_packed",
}


def _bitnet_config(hf: Mapping[str, Any]) -> dict[str, Any]:
  _require(hf, "hidden_act", ("relu2",), "relu2")
  _require(hf, "attention_bias", (False,), False)
  linear = "dense"
  quant = hf.get("quantization_config")
  if quant:
    _check_value("quantization_config.quant_method", quant.get("quant_method"), ("bitnet",))
    _check_value("quantization_config.use_rms_norm", quant.get("use_rms_norm", False), (False,))
    not_converted = set(quant.get("modules_to_not_convert") or ()) - {"lm_head"}
    if not_converted:
      raise CheckpointError(
        f"config.json: quantization_config.modules_to_not_convert={sorted(not_converted)}: "
        "jaxtune quantizes every projection but the output layer"
      )
    key = (quant.get("linear_class", "bitlinear"), quant.get("quantization_mode", "offline"))
    _check_value(
      "quantization_config (linear_class, quantization_mode)", key, tuple(_BITNET_LINEAR)
    )
    linear = _BITNET_LINEAR[key]
  return _decoder_config(hf, tie_default=False) | dict(
    mlp="relu2", sub_norm=True, linear=linear, bitnet_groups=1
  )


def _gpt2_config(hf: Mapping[str, Any]) -> dict[str, Any]:
  _require(hf, "activation_function", _TANH_GELUS, "gelu_new")
  _require(hf, "scale_attn_weights", (True,), True)
  _require(hf, "scale_attn_by_inverse_layer_idx", (False,), False)
  _require(hf, "add_cross_attention", (False,), False)
  dim = _get(hf, "n_embd")
  return dict(
    vocab_size=_get(hf, "vocab_size"),
    dim=dim,
    num_layers=_get(hf, "n_layer"),
    num_heads=_get(hf, "n_head"),
    mlp_dim=_get(hf, "n_inner", 4 * dim),
    mlp="gelu",
    norm="layernorm",
    norm_eps=float(_get(hf, "layer_norm_epsilon")),
    use_bias=True,
    position="learned",
    max_seq_len=_get(hf, "n_positions"),
    tie_embeddings=bool(_get(hf, "tie_word_embeddings", True)),
  )


def _decoder_hf(cfg: ModelConfig, act: str) -> dict[str, Any]:
  return dict(
    vocab_size=cfg.vocab_size,
    hidden_size=cfg.dim,
    intermediate_size=cfg.mlp_dim,
    num_hidden_layers=cfg.num_layers,
    num_attention_heads=cfg.num_heads,
    num_key_value_heads=cfg.kv_heads,
    head_dim=cfg.head_size,
    hidden_act=act,
    max_position_embeddings=cfg.max_seq_len,
    rms_norm_eps=cfg.norm_eps,
    rope_theta=cfg.rope_theta,  # transformers 4; 5 reads rope_parameters.
    rope_parameters=dict(rope_type="default", rope_theta=cfg.rope_theta),
    tie_word_embeddings=cfg.tie_embeddings,
  )


def _llama_hf(cfg: ModelConfig) -> dict[str, Any]:
  return _decoder_hf(cfg, "silu") | dict(attention_bias=False, mlp_bias=False)


def _qwen2_hf(cfg: ModelConfig) -> dict[str, Any]:
  return _decoder_hf(cfg, "silu") | dict(use_sliding_window=False, sliding_window=None)


def _gemma_hf(cfg: ModelConfig) -> dict[str, Any]:
  return _decoder_hf(cfg, "gelu_pytorch_tanh") | dict(attention_bias=False)


# model.linear -> the quantization_config written (packed: BitLinear, as published checkpoints).
_BITNET_QUANTIZATION = {
  "dense": None,
  "bitnet158": dict(linear_class="autobitlinear", quantization_mode="online"),
  "bitnet158_packed": dict(linear_class="bitlinear", quantization_mode="offline"),
}


def _bitnet_hf(cfg: ModelConfig) -> dict[str, Any]:
  hf = _decoder_hf(cfg, "relu2") | dict(attention_bias=False)
  quant = _BITNET_QUANTIZATION.get(cfg.linear)
  if quant is not None:
    hf["quantization_config"] = dict(quant_method="bitnet", use_rms_norm=False, **quant)
  return hf


def _gpt2_hf(cfg: ModelConfig) -> dict[str, Any]:
  # GPT-2's <|endoftext|> (transformers' default) only where the vocabulary has it.
  end_of_text = 50256 if cfg.vocab_size > 50256 else None
  return dict(
    bos_token_id=end_of_text,
    eos_token_id=end_of_text,
    vocab_size=cfg.vocab_size,
    n_embd=cfg.dim,
    n_layer=cfg.num_layers,
    n_head=cfg.num_heads,
    n_inner=cfg.mlp_dim,
    n_positions=cfg.max_seq_len,
    activation_function="gelu_new",
    layer_norm_epsilon=cfg.norm_eps,
    tie_word_embeddings=cfg.tie_embeddings,
  )


FAMILIES: dict[str, Family] = {
  "llama": Family(
    ("LlamaForCausalLM", "LlamaModel"), "model.", _llama_config, _llama_hf, _decoder_tensors
  ),
  "mistral": Family(
    ("MistralForCausalLM", "MistralModel"), "model.", _llama_config, _llama_hf, _decoder_tensors
  ),
  "qwen2": Family(
    ("Qwen2ForCausalLM", "Qwen2Model"), "model.", _qwen2_config, _qwen2_hf, _decoder_tensors
  ),
  "gemma": Family(
    ("GemmaForCausalLM", "GemmaModel"),
    "model.",
    _gemma_config,
    _gemma_hf,
    functools.partial(_decoder_tensors, norm_offset=1.0),
  ),
  "gpt2": Family(
    ("GPT2LMHeadModel", "GPT2Model"), "transformer.", _gpt2_config, _gpt2_hf, _gpt2_tensors
  ),
  "bitnet": Family(
    ("BitNetForCausalLM", "BitNetModel"), "model.", _bitnet_config, _bitnet_hf, _bitnet_tensors
  ),
}


def _architecture(cfg: ModelConfig) -> dict[str, Any]:
  """The fields that define the function a model computes, with derived head counts and sizes."""
  fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
  for name in _NOT_ARCHITECTURE:
    del fields[name]
  fields.update(num_kv_heads=cfg.kv_heads, head_dim=cfg.head_size, bitnet_groups=cfg.groups)
  if cfg.position != "rope":
    del fields["rope_theta"]
  return fields


def family_for(cfg: ModelConfig) -> str:
  """The `model_type` to export `cfg` as; a CheckpointError if no family computes the same model."""
  if cfg.position == "learned" and cfg.use_bias:
    model_type = "gpt2"
  elif cfg.qkv_bias:
    model_type = "qwen2"
  elif cfg.scale_embeddings and cfg.mlp == "geglu":
    model_type = "gemma"
  elif cfg.sub_norm:
    model_type = "bitnet"
  else:
    model_type = "llama"
  family = FAMILIES[model_type]
  ours = _architecture(cfg)
  theirs = _architecture(ModelConfig(**family.to_config(family.to_hf(cfg))))
  lost = [f"model.{k}={v!r}" for k, v in ours.items() if theirs.get(k) != v]
  if lost:
    raise CheckpointError(
      f"this model has no Hugging Face equivalent: the closest, {family.architectures[0]}, "
      f"cannot express {', '.join(lost)}"
    )
  return model_type
