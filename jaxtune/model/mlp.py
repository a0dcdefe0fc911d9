"""The feed-forward layer: SwiGLU / GeGLU / ReLU^2-GLU (`down(act(gate x) * up x)`) or GELU
(`down(gelu(up x))`), with HF BitNet's `ffn_sub_norm` before `down` under `model.sub_norm`.

Shape letters: B batch, T length, D model dim, F mlp dim.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtune.config_model import ModelConfig
from jaxtune.model.adapters import NONE, Adapters
from jaxtune.model.bitlinear import SubNorm
from jaxtune.model.layers import constrain
from jaxtune.model.linear import Linear, Projection

_ACTIVATIONS = {
  "swiglu": jax.nn.silu,
  "geglu": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu": lambda x: jax.nn.gelu(x, approximate=True),
  "relu2": lambda x: jnp.square(jax.nn.relu(x)),
}


class Mlp(nn.Module):
  config: ModelConfig
  adapters: Adapters = NONE
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_btd: jax.Array, adapter_ids_b: jax.Array | None = None) -> jax.Array:
    cfg = self.config
    d, f = cfg.dim, cfg.mlp_dim
    bias_axes = 1 if cfg.use_bias else 0
    into = Projection("btd,df->btf", (d, f), ("embed", "mlp"), bias_axes)
    out_of = Projection("btf,fd->btd", (f, d), ("mlp", "embed"), bias_axes)

    def proj(name, projection, x):
      lora = self.adapters.lora(name)
      module = Linear(projection, cfg, lora, self.deterministic, name=name)
      return module(x, adapter_ids_b)

    act = _ACTIVATIONS[cfg.mlp]
    h_btf = act(proj("up" if cfg.mlp == "gelu" else "gate", into, x_btd))
    if cfg.mlp != "gelu":
      h_btf = h_btf * proj("up", into, x_btd)
    h_btf = constrain(h_btf, ("act_batch", "act_seq", "act_mlp"))
    if cfg.sub_norm:
      h_btf = SubNorm(("mlp",), (f,), cfg, name="sub_norm")(h_btf)
    return proj("down", out_of, h_btf)
