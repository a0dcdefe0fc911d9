"""A ViT image encoder in CLIP's and SigLIP's layouts, for LLaVA's vision tower.

Shape letters: B images, Y X pixel rows and columns, C channels, p q rows and columns within a
patch, S tokens (patches, and CLIP's class token first), D width, F mlp dim, N heads, H head dim,
L layers.

Images come channels last, [B, Y, X, C], normalized as the encoder's preprocessor says. The
patch embedding is a stride-`patch_size` convolution, computed as one einsum over the patches.
Blocks are pre-norm (`x + attn(ln1 x)`, then `+ mlp(ln2 x)`), with biases everywhere, stacked on a
leading `layers` axis under `nn.scan`. `__call__` gives every hidden state as Hugging Face's
`hidden_states` counts them (the embeddings, then each block's output), so LLaVA can take the
penultimate one; `last_hidden` applies the final LayerNorm (SigLIP's `last_hidden_state`, CLIP's
pooled output).

Weights and activations carry the decoder's logical axis names (`embed`, `q_heads`, `mlp`, ...),
so the same rules shard the encoder over the 2D mesh.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtune.config_vision import VisionConfig
from jaxtune.model.layers import INIT_STDDEV, constrain, normalize, weight

ACT_BSD = ("act_batch", "act_seq", "act_embed")

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
  "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
  "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


def dtypes(cfg: VisionConfig) -> tuple[jnp.dtype, jnp.dtype]:
  return jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)


def patches(pixels_byxc: jax.Array, patch: int) -> jax.Array:
  """Non-overlapping patches [B, S, p, q, C], row-major over the grid."""
  b, y, x, c = pixels_byxc.shape
  grid_y, grid_x = y // patch, x // patch
  p = pixels_byxc.reshape(b, grid_y, patch, grid_x, patch, c).transpose(0, 1, 3, 2, 4, 5)
  return p.reshape(b, grid_y * grid_x, patch, patch, c)


def attend(q_bsnh: jax.Array, k_bsnh: jax.Array, v_bsnh: jax.Array) -> jax.Array:
  """Bidirectional softmax attention (every token sees every token), softmax in float32."""
  scale = q_bsnh.shape[-1] ** -0.5
  scores_bnst = jnp.einsum("bsnh,btnh->bnst", q_bsnh, k_bsnh).astype(jnp.float32) * scale
  probs_bnst = jax.nn.softmax(scores_bnst, axis=-1).astype(v_bsnh.dtype)
  return jnp.einsum("bnst,btnh->bsnh", probs_bnst, v_bsnh)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis with scale and bias, computed in float32."""

  config: VisionConfig

  @nn.compact
  def __call__(self, x_bsd: jax.Array) -> jax.Array:
    cfg = self.config
    dtype, param_dtype = dtypes(cfg)
    scale = weight(self, "scale", nn.initializers.ones, (cfg.dim,), ("embed",), param_dtype)
    bias = weight(self, "bias", nn.initializers.zeros, (cfg.dim,), ("embed",), param_dtype)
    return normalize(x_bsd, scale, bias, cfg.norm_eps, center=True).astype(dtype)


class Dense(nn.Module):
  """`einsum(equation, x, kernel) + bias`; the bias spans the kernel's last `bias_axes` axes."""

  equation: str
  shape: tuple[int, ...]
  names: tuple[str | None, ...]
  config: VisionConfig
  bias_axes: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dtype, param_dtype = dtypes(self.config)
    init = nn.initializers.normal(INIT_STDDEV)
    kernel = weight(self, "kernel", init, self.shape, self.names, param_dtype)
    y = jnp.einsum(self.equation, x.astype(dtype), kernel.astype(dtype))
    if self.bias_axes:
      n = self.bias_axes
      bias = weight(
        self, "bias", nn.initializers.zeros, self.shape[-n:], self.names[-n:], param_dtype
      )
      y = y + bias.astype(dtype)
    return y


class Embeddings(nn.Module):
  """Patches to tokens: the patch projection, CLIP's class token first, learned positions."""

  config: VisionConfig

  @nn.compact
  def __call__(self, pixels_byxc: jax.Array) -> jax.Array:
    cfg = self.config
    dtype, param_dtype = dtypes(cfg)
    if pixels_byxc.shape[1:] != (cfg.image_size, cfg.image_size, cfg.channels):
      raise ValueError(
        f"images of shape {pixels_byxc.shape[1:]}, but the encoder takes "
        f"{(cfg.image_size, cfg.image_size, cfg.channels)}"
      )
    p = cfg.patch_size
    patch = Dense(
      "bspqc,pqcd->bsd",
      (p, p, cfg.channels, cfg.dim),
      (None, None, None, "embed"),
      cfg,
      bias_axes=int(cfg.patch_bias),
      name="patch",
    )
    x_bsd = patch(patches(pixels_byxc, p))
    if cfg.class_token:
      init = nn.initializers.normal(INIT_STDDEV)
      cls_d = weight(self, "class_token", init, (cfg.dim,), ("embed",), param_dtype)
      cls_b1d = jnp.broadcast_to(cls_d.astype(dtype), (x_bsd.shape[0], 1, cfg.dim))
      x_bsd = jnp.concatenate([cls_b1d, x_bsd], axis=1)
    init = nn.initializers.normal(INIT_STDDEV)
    shape = (cfg.num_positions, cfg.dim)
    positions_sd = weight(self, "position", init, shape, ("position", "embed"), param_dtype)
    return constrain(x_bsd + positions_sd.astype(dtype)[None], ACT_BSD)


class Block(nn.Module):
  """One pre-norm block; called under `nn.scan` as `(x, None) -> (x, x)`, so the scan also
  returns every block's output."""

  config: VisionConfig

  @nn.compact
  def __call__(self, x_bsd: jax.Array, _: None) -> tuple[jax.Array, jax.Array]:
    cfg = self.config
    d, n, h, f = cfg.dim, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
    heads = ("embed", "q_heads", "head_dim")
    act_heads = ("act_batch", "act_seq", "act_heads", "act_head_dim")

    def qkv(name, h_bsd):
      proj = Dense("bsd,dnh->bsnh", (d, n, h), heads, cfg, bias_axes=2, name=name)
      return constrain(proj(h_bsd), act_heads)

    h_bsd = LayerNorm(cfg, name="attn_norm")(x_bsd)
    o_bsnh = attend(qkv("q", h_bsd), qkv("k", h_bsd), qkv("v", h_bsd))
    out = Dense("bsnh,nhd->bsd", (n, h, d), ("q_heads", "head_dim", "embed"), cfg, name="o")
    x_bsd = constrain(x_bsd + out(o_bsnh), ACT_BSD)

    h_bsd = LayerNorm(cfg, name="mlp_norm")(x_bsd)
    up = Dense("bsd,df->bsf", (d, f), ("embed", "mlp"), cfg, name="up")
    h_bsf = constrain(ACTIVATIONS[cfg.act](up(h_bsd)), ("act_batch", "act_seq", "act_mlp"))
    down = Dense("bsf,fd->bsd", (f, d), ("mlp", "embed"), cfg, name="down")
    x_bsd = constrain(x_bsd + down(h_bsf), ACT_BSD)
    return x_bsd, x_bsd


class VisionEncoder(nn.Module):
  """A ViT: `__call__(pixels [B, Y, X, C])` -> the hidden states [L + 1, B, S, D]."""

  config: VisionConfig

  def setup(self) -> None:
    cfg = self.config
    self.embeddings = Embeddings(cfg)
    if cfg.pre_norm:
      self.pre_norm = LayerNorm(cfg)
    self.layers = nn.scan(
      Block,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      length=cfg.num_layers,
      metadata_params={nn.PARTITION_NAME: "layers"},
    )(cfg)
    self.post_norm = LayerNorm(cfg)

  def __call__(self, pixels_byxc: jax.Array) -> jax.Array:
    """Every hidden state, as Hugging Face's `hidden_states`: [0] the embeddings (after CLIP's
    pre-norm), [k] the output of block k."""
    x_bsd = self.embeddings(pixels_byxc.astype(dtypes(self.config)[0]))
    if self.config.pre_norm:
      x_bsd = self.pre_norm(x_bsd)
    _, hidden_lbsd = self.layers(x_bsd, None)
    return jnp.concatenate([x_bsd[None], hidden_lbsd], axis=0)

  def last_hidden(self, x_bsd: jax.Array) -> jax.Array:
    """The final LayerNorm of the last hidden state: SigLIP's `last_hidden_state`."""
    return self.post_norm(x_bsd)


def init_fn(config: VisionConfig, batch: int = 1):
  """`rng -> variables` (boxed with logical names) of a `VisionEncoder`, for
  `sharding.init_sharded`; the final norm's parameters included."""
  module = VisionEncoder(config)
  pixels = jnp.zeros((batch, config.image_size, config.image_size, config.channels))

  def init(rng: jax.Array):
    return module.init(rng, pixels, method=_all)

  return init


def _all(module: VisionEncoder, pixels_byxc: jax.Array) -> jax.Array:
  return module.last_hidden(module(pixels_byxc)[-1])
