"""Heads on the final hidden states besides the output layer (`Transformer.logits`).

Shape letters: B batch, T length, D model dim.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtune.config_model import ModelConfig
from jaxtune.model.layers import INIT_STDDEV, dtypes, weight


class ScalarHead(nn.Module):
  """A number per token, `h . w` (float32 [B, T]): the reward of InstructGPT's reward model (read
  at a sequence's last token) or a PPO value function. No bias by default, as in Hugging Face's
  `*ForSequenceClassification` `score` layer with one label, whose weight maps onto `kernel`; a
  reward's offset cancels in the pairwise loss anyway. With `bias`, an offset (float32, 0 at
  first, never trained): a trained reward model sets it so that demonstrations score 0 on
  average, as InstructGPT's does (`train/reward.py`)."""

  config: ModelConfig
  bias: bool = False

  @nn.compact
  def __call__(self, h_btd: jax.Array) -> jax.Array:
    _, param_dtype = dtypes(self.config)
    init = nn.initializers.normal(INIT_STDDEV)
    w_d = weight(self, "kernel", init, (self.config.dim,), ("embed",), param_dtype)
    score_bt = jnp.einsum("btd,d->bt", h_btd.astype(jnp.float32), w_d.astype(jnp.float32))
    if self.bias:  # Set, never learned: its gradient would be rounding, which Adam scales up.
      bias = weight(self, "bias", nn.initializers.zeros, (), (), jnp.float32)
      score_bt += jax.lax.stop_gradient(bias)
    return score_bt
