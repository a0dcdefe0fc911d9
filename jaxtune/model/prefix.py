"""The layers of prefix tuning (Li and Liang 2021) and prompt tuning (Lester et al. 2021).

Shape letters: L layers, P prefix length, B batch, T length, D model dim, E the MLP's hidden
width, K KV heads, H head dim, M adapters in a bank.

A prefix is P extra keys and values at every layer that every query attends to, sized to the KV
heads (so it composes with GQA and MQA). The tokens' positions start at P, as if the prefix were
P earlier tokens. Training can reparameterize the prefix through an MLP, `tanh(e W1 + b1) W2 + b2`
of P trainable embeddings e (`peft.prefix.collapse` computes it once for inference).

A soft prompt is P trainable embeddings before each row's tokens; each packed segment of a row
sees it (its keys are in `attention.SHARED_SEGMENT`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtune.config_model import ModelConfig
from jaxtune.model.adapters import Adapters
from jaxtune.model.attention import SHARED_SEGMENT
from jaxtune.model.layers import weight

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
  adapters: Adapters

  @nn.compact
  def __call__(self, adapter_ids_b: jax.Array | None, batch: int) -> tuple[jax.Array, jax.Array]:
    cfg, bank = self.config, self.adapters.bank
    n_layers, p, k, h = cfg.num_layers, self.adapters.prefix_length, cfg.kv_heads, cfg.head_size
    e = self.adapters.prefix_hidden
    param_dtype = jnp.dtype(cfg.param_dtype)

    def param(name, init, shape, names):
      return weight(self, name, init, shape, names, param_dtype)

    if e:
      if bank:
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

    bank_shape, bank_names = ((bank,), ("adapters",)) if bank else ((), ())
    shape, names = (*bank_shape, n_layers, p, k, h), (*bank_names, *_KV_NAMES)
    key = param("key", nn.initializers.normal(1.0), shape, names)
    value = param("value", nn.initializers.normal(1.0), shape, names)
    if not bank:
      return _per_row(key, batch), _per_row(value, batch)
    # [M, L, P, K, H] -> each row's prefix, [L, B, P, K, H].
    return key[adapter_ids_b].swapaxes(0, 1), value[adapter_ids_b].swapaxes(0, 1)


def _per_row(x_lpkh: jax.Array, batch: int) -> jax.Array:
  return jnp.broadcast_to(x_lpkh[:, None], (x_lpkh.shape[0], batch, *x_lpkh.shape[1:]))


def prepend_prompt(
  prompt_pd: jax.Array, x_btd: jax.Array, positions_bt: jax.Array, segment_ids_bt: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Puts the soft prompt before each row: (inputs, positions, segment ids), each P longer."""
  b, p = x_btd.shape[0], prompt_pd.shape[0]
  x_btd = jnp.concatenate(
    [jnp.broadcast_to(prompt_pd.astype(x_btd.dtype), (b, p, x_btd.shape[-1])), x_btd], axis=1
  )
  positions_bt = jnp.concatenate(
    [jnp.broadcast_to(jnp.arange(p, dtype=positions_bt.dtype), (b, p)), positions_bt + p], axis=1
  )
  shared_bp = jnp.full((b, p), SHARED_SEGMENT, segment_ids_bt.dtype)
  return x_btd, positions_bt, jnp.concatenate([shared_bp, segment_ids_bt], axis=1)
