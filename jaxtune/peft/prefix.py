"""Prefix tuning (Li and Liang 2021) and prompt tuning (Lester et al. 2021).

Shape letters: L layers, P prefix length, B batch, T length, D model dim, E the MLP's hidden
width, K KV heads, H head dim, M adapters in a bank.

A prefix is P extra keys and values at every layer that every query attends to, sized to the KV
heads (so it composes with GQA and MQA). The tokens' positions start at P, as if the prefix were
P earlier tokens. Training can reparameterize the prefix through an MLP, `tanh(e W1 + b1) W2 + b2`
of P trainable embeddings e; `collapse` computes the MLP once and keeps plain keys and values for
inference.

A soft prompt is P trainable embeddings before each row's tokens; each packed segment of a row
sees it (its keys are in `attention.SHARED_SEGMENT`). Its keys and values at each layer depend
only on the prompt, so `from_prompt` turns a prompt into the prefix with the same effect, which is
how a prompt-tuned model decodes with a KV cache.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.config import ModelConfig, PeftConfig
from jaxtune.model.layers import weight

log = logging.getLogger(__name__)

_KV_NAMES = ("layers", "prefix", "kv_heads", "head_dim")
_MLP_NAMES = {  # The reparameterizing MLP's arrays and their logical axes.
  "embedding": ("prefix", "embed"),
  "w1": ("embed", "prefix_hidden"),
  "b1": ("prefix_hidden",),
  "w2": ("prefix_hidden", "layers", None, "kv_heads", "head_dim"),
  "b2": ("layers", None, "kv_heads", "head_dim"),
}


def mlp_kv(p: Any) -> tuple[jax.Array, jax.Array]:
  """The reparameterized prefix: (keys, values), each [L, P, K, H] float32."""
  f32 = lambda name: p[name].astype(jnp.float32)  # noqa: E731
  h_pe = jnp.tanh(f32("embedding") @ f32("w1") + f32("b1"))
  kv_plskh = jnp.einsum("pe,elskh->plskh", h_pe, f32("w2")) + f32("b2")
  return kv_plskh[:, :, 0].swapaxes(0, 1), kv_plskh[:, :, 1].swapaxes(0, 1)


class Prefix(nn.Module):
  """Holds a prefix (plain or through the MLP) and returns its per-layer keys and values,
  ([L, B, P, K, H], [L, B, P, K, H]), for a batch of `batch` rows."""

  config: ModelConfig
  peft: PeftConfig
  adapters: int = 0

  @nn.compact
  def __call__(self, adapter_ids_b: jax.Array | None, batch: int) -> tuple[jax.Array, jax.Array]:
    cfg, peft = self.config, self.peft
    n_layers, p, k, h, e = (
      cfg.num_layers,
      peft.prefix_length,
      cfg.kv_heads,
      cfg.head_size,
      peft.prefix_hidden,
    )
    param_dtype = jnp.dtype(cfg.param_dtype)

    def param(name, init, shape, names):
      return weight(self, name, init, shape, names, param_dtype)

    if e:
      if self.adapters:
        raise ValueError("a bank of prefixes needs collapsed prefixes (prefix.collapse)")
      normal, zeros = nn.initializers.normal(1.0), nn.initializers.zeros
      fan_in = nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=0, out_axis=-1)
      shapes = {
        "embedding": (normal, (p, cfg.dim)),
        "w1": (fan_in, (cfg.dim, e)),
        "b1": (zeros, (e,)),
        "w2": (fan_in, (e, n_layers, 2, k, h)),
        "b2": (zeros, (n_layers, 2, k, h)),
      }
      arrays = {n: param(n, init, shape, _MLP_NAMES[n]) for n, (init, shape) in shapes.items()}
      k_lpkh, v_lpkh = mlp_kv(arrays)
      return _per_row(k_lpkh, batch), _per_row(v_lpkh, batch)

    bank_shape, bank_names = ((self.adapters,), ("adapters",)) if self.adapters else ((), ())
    shape, names = (*bank_shape, n_layers, p, k, h), (*bank_names, *_KV_NAMES)
    key = param("key", nn.initializers.normal(1.0), shape, names)
    value = param("value", nn.initializers.normal(1.0), shape, names)
    if not self.adapters:
      return _per_row(key, batch), _per_row(value, batch)
    # [M, L, P, K, H] -> each row's prefix, [L, B, P, K, H].
    return key[adapter_ids_b].swapaxes(0, 1), value[adapter_ids_b].swapaxes(0, 1)


def _per_row(x_lpkh: jax.Array, batch: int) -> jax.Array:
  return jnp.broadcast_to(x_lpkh[:, None], (x_lpkh.shape[0], batch, *x_lpkh.shape[1:]))


def prepend_prompt(
  prompt_pd: jax.Array, x_btd: jax.Array, positions_bt: jax.Array, segment_ids_bt: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Puts the soft prompt before each row: (inputs, positions, segment ids), each P longer."""
  from jaxtune.model.attention import SHARED_SEGMENT  # noqa: PLC0415 (attention imports peft)

  b, p = x_btd.shape[0], prompt_pd.shape[0]
  x_btd = jnp.concatenate(
    [jnp.broadcast_to(prompt_pd.astype(x_btd.dtype), (b, p, x_btd.shape[-1])), x_btd], axis=1
  )
  positions_bt = jnp.concatenate(
    [jnp.broadcast_to(jnp.arange(p, dtype=positions_bt.dtype), (b, p)), positions_bt + p], axis=1
  )
  shared_bp = jnp.full((b, p), SHARED_SEGMENT, segment_ids_bt.dtype)
  return x_btd, positions_bt, jnp.concatenate([shared_bp, segment_ids_bt], axis=1)


def activations(
  model: nn.Module, params: Any, tokens_bt: jax.Array, segment_ids_bt: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
  """The keys and values each layer computes for `tokens_bt`: ([L, B, S, K, H], same), where S
  counts a soft prompt's P positions too."""
  _, state = model.apply(
    {"params": params}, tokens_bt, None, segment_ids_bt, mutable="intermediates"
  )
  ((k_lbskh, v_lbskh),) = state["intermediates"]["layers"]["attn"]["kv"]
  return k_lbskh, v_lbskh


def _repeat_to(ids: Sequence[int], length: int) -> np.ndarray:
  if not ids:
    raise ValueError("the initialization text has no tokens")
  return np.resize(np.asarray(ids, np.int32), length)


def init_from_text(
  base_model: nn.Module, base_params: Any, prefix_params: Any, ids: Sequence[int]
) -> Any:
  """`prefix_params` (the 'prefix' subtree) set so the prefix starts as the activations of the
  tokens `ids` (repeated to P) in the base model, as Li and Liang initialize from real words.

  With the MLP, its output layer is solved by least squares to give those activations, which is
  exact when the hidden width E is at least P.
  """
  if "key" in prefix_params:
    p = prefix_params["key"].shape[-3]
  else:
    p = prefix_params["embedding"].shape[0]
  tokens = jnp.asarray(_repeat_to(ids, p))[None]
  k_lbpkh, v_lbpkh = activations(base_model, base_params, tokens)
  if "key" in prefix_params:
    cast = lambda x, like: x[:, 0].astype(like.dtype)  # noqa: E731
    return {
      "key": cast(k_lbpkh, prefix_params["key"]),
      "value": cast(v_lbpkh, prefix_params["value"]),
    }
  target_plskh = jnp.stack([k_lbpkh[:, 0], v_lbpkh[:, 0]], axis=2).swapaxes(0, 1)
  w2 = prefix_params["w2"]
  p_ = {n: x.astype(jnp.float32) for n, x in prefix_params.items()}
  h_pe = jnp.tanh(p_["embedding"] @ p_["w1"] + p_["b1"])
  flat_target = (target_plskh - p_["b2"]).reshape(p, -1)
  solution, *_ = jnp.linalg.lstsq(h_pe, flat_target)
  if h_pe.shape[1] < p:
    log.warning(
      "prefix MLP width %d < prefix length %d: the initialization is approximate", h_pe.shape[1], p
    )
  return dict(prefix_params, w2=solution.reshape(w2.shape).astype(w2.dtype))


def init_prompt_from_text(
  cfg: ModelConfig, params: Any, ids: Sequence[int], length: int
) -> jax.Array:
  """A soft prompt [P, D] starting as the input embeddings of `ids` (repeated to P)."""
  table_vd = params["embed"]["embedding"]
  prompt_pd = table_vd[_repeat_to(ids, length)]
  if cfg.scale_embeddings:
    prompt_pd = prompt_pd * np.sqrt(cfg.dim)
  return prompt_pd.astype(table_vd.dtype)


def collapse(params: Any, peft: PeftConfig) -> tuple[Any, PeftConfig]:
  """The reparameterized prefix computed once: params with plain keys and values, and the
  config of a model that holds them (`prefix_hidden=0`)."""
  if peft.method != "prefix" or not peft.prefix_hidden or not peft.prefix_length:
    return params, peft
  k_lpkh, v_lpkh = mlp_kv(params["prefix"])
  dtype = params["prefix"]["w2"].dtype
  collapsed = {"key": k_lpkh.astype(dtype), "value": v_lpkh.astype(dtype)}
  return dict(params, prefix=collapsed), dataclasses.replace(peft, prefix_hidden=0)


def from_prompt(model: nn.Module, params: Any) -> tuple[Any, PeftConfig]:
  """A prompt-tuned model's params turned into a prefix with the same effect (the prompt's keys
  and values at each layer), and the config of a model that holds it."""
  peft = model.peft
  p = peft.prompt_length
  if peft.method != "prompt" or not p:
    raise ValueError("from_prompt needs a prompt-tuned model")
  pad = jnp.zeros((1, 1), jnp.int32)  # One padding token after the prompt; nothing sees it.
  k_lbskh, v_lbskh = activations(model, params, pad, pad)
  converted = {n: x for n, x in params.items() if n != "prompt"}
  dtype = params["prompt"].dtype
  converted["prefix"] = {
    "key": k_lbskh[:, 0, :p].astype(dtype),
    "value": v_lbskh[:, 0, :p].astype(dtype),
  }
  new_peft = dataclasses.replace(peft, method="prefix", prefix_length=p, prefix_hidden=0)
  return converted, new_peft


def for_decoding(model: nn.Module, params: Any) -> tuple[nn.Module, Any]:
  """The model and params to decode with: a prompt as its prefix, an MLP prefix collapsed
  (LoRA and the base model decode as they are)."""
  peft = model.peft
  if peft.method == "prompt" and peft.prompt_length:
    params, peft = from_prompt(model, params)
  params, peft = collapse(params, peft)
  return model.clone(peft=peft), params
