"""Multi-head to grouped- or multi-query attention by mean-pooling K/V heads (Ainslie et al. 2023).

"Uptraining" converts a checkpoint this way, then continues pretraining it for a small fraction
(about 5%) of its original steps; see configs/uptrain_gqa.yaml.

Shape letters: L layers, D model dim, K KV heads before, J after, G heads pooled into one
(K = J * G), H head dim. Query head n used KV head n // (N / K) and now uses n // (N / J), so new
head j is the mean of old heads j*G .. (j+1)*G - 1, as in Hugging Face's `repeat_kv` order.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxtune.config_model import ModelConfig
from jaxtune.errors import ConfigError

logger = logging.getLogger(__name__)


def to_kv_heads(
  config: ModelConfig, variables: Mapping[str, Any], kv_heads: int
) -> tuple[ModelConfig, Mapping[str, Any]]:
  """Pools the K/V projections (kernels and biases) of `variables` (`{'params': ...}`, unboxed)
  down to `kv_heads` heads, which must divide the current number; other arrays are kept as is.

  `kv_heads` equal to the current number returns `config` and `variables` unchanged.
  """
  k = config.kv_heads
  if kv_heads <= 0 or k % kv_heads:
    raise ConfigError(
      f"cannot pool {k} KV heads into {kv_heads}: the new model.num_kv_heads must be a positive "
      f"divisor of {k}"
    )
  if kv_heads == k:
    return config, variables
  g = k // kv_heads
  new_config = dataclasses.replace(config, num_kv_heads=kv_heads)
  new_config.validate()

  def pool(x: jax.Array, axis: int) -> jax.Array:  # Splits K at `axis` into [J, G], means G.
    x = jnp.asarray(x)
    grouped = x.reshape(*x.shape[:axis], kv_heads, g, *x.shape[axis + 1 :])
    return jnp.mean(grouped, axis=axis + 1, dtype=jnp.float32).astype(x.dtype)

  params = variables["params"]
  attn = dict(params["layers"]["attn"])
  for name in ("k", "v"):
    proj = {"kernel": pool(attn[name]["kernel"], 2)}  # [L, D, K, H]
    if "bias" in attn[name]:
      proj["bias"] = pool(attn[name]["bias"], 1)  # [L, K, H]
    attn[name] = proj
  layers = dict(params["layers"], attn=attn)
  logger.info("pooled %d KV heads into %d (groups of %d)", k, kv_heads, g)
  return new_config, dict(variables, params=dict(params, layers=layers))
