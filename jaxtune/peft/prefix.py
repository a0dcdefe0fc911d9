"""Prefix and prompt tuning on a parameter tree: start from real text, and turn what trained
into what decodes.

Shape letters: L layers, P prefix length, B batch, S key length, D model dim, K KV heads, H head
dim. The layers themselves (the prefix's keys and values, the soft prompt) are in
`model/prefix.py`.

A soft prompt's keys and values at each layer depend only on the prompt, so `from_prompt` turns a
prompt into the prefix with the same effect, which is how a prompt-tuned model decodes with a KV
cache; `collapse` computes a reparameterized prefix's MLP once and keeps plain keys and values.
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

from jaxtune.config_model import ModelConfig
from jaxtune.model.adapters import PREFIX, PROMPT, Adapters
from jaxtune.model.prefix import mlp_kv

log = logging.getLogger(__name__)


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


def collapse(params: Any, adapters: Adapters) -> tuple[Any, Adapters]:
  """The reparameterized prefix computed once: params with plain keys and values, and the
  adapters of a model that holds them (`prefix_hidden=0`)."""
  if not adapters.prefix_length or not adapters.prefix_hidden:
    return params, adapters
  k_lpkh, v_lpkh = mlp_kv(params[PREFIX])
  dtype = params[PREFIX]["w2"].dtype
  collapsed = {"key": k_lpkh.astype(dtype), "value": v_lpkh.astype(dtype)}
  return dict(params, **{PREFIX: collapsed}), dataclasses.replace(adapters, prefix_hidden=0)


def from_prompt(model: nn.Module, params: Any) -> tuple[Any, Adapters]:
  """A prompt-tuned model's params turned into a prefix with the same effect (the prompt's keys
  and values at each layer), and the adapters of a model that holds it."""
  p = model.adapters.prompt_length
  if not p:
    raise ValueError("from_prompt needs a prompt-tuned model")
  pad = jnp.zeros((1, 1), jnp.int32)  # One padding token after the prompt; nothing sees it.
  k_lbskh, v_lbskh = activations(model, params, pad, pad)
  converted = {n: x for n, x in params.items() if n != PROMPT}
  dtype = params[PROMPT].dtype
  converted[PREFIX] = {
    "key": k_lbskh[:, 0, :p].astype(dtype),
    "value": v_lbskh[:, 0, :p].astype(dtype),
  }
  adapters = dataclasses.replace(model.adapters, prompt_length=0, prefix_length=p, prefix_hidden=0)
  return converted, adapters


def for_decoding(model: nn.Module, params: Any) -> tuple[nn.Module, Any]:
  """The model and params to decode with: a prompt as its prefix, an MLP prefix collapsed
  (LoRA and the base model decode as they are)."""
  adapters = model.adapters
  if adapters.prompt_length:
    params, adapters = from_prompt(model, params)
  params, adapters = collapse(params, adapters)
  return model.clone(adapters=adapters), params
