"""LLaVA: a decoder that reads images. A vision encoder's features, mapped to the decoder's width
by a projector, take the place of the `<image>` placeholder tokens.

Shape letters: B rows, M images per row, Y X pixel rows and columns, C channels, S image tokens
per image, E the encoder's width, D the decoder's width, T length, K image slots in a row (M*S).

`Llava` is a `Transformer` (its parameters, KV cache and heads are the decoder's, at the top of
the tree) with two more parameter groups beside them: `vision` (the encoder, `model/vision.py`)
and `projector`. Given `images` [B, M, Y, X, C], row b's k-th image token (`image_token_id`)
takes the k-th feature vector of its M images, in order (`splice`): a row can hold several
conversations, each with its own images (packing), and rows with fewer images leave the rest of
their M unused (zeros). Without `images` it is the plain decoder, which is what decoding the
tokens after a prompt needs: the image features are in the KV cache already.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtune.config_vision import LlavaConfig, VisionConfig
from jaxtune.model.layers import constrain
from jaxtune.model.transformer import Transformer
from jaxtune.model.vision import ACTIVATIONS, Dense, VisionEncoder

_ACT_BSD = ("act_batch", "act_seq", "act_embed")


def splice(x_btd: jax.Array, is_image_bt: jax.Array, features_bkd: jax.Array) -> jax.Array:
  """`x_btd` with row b's k-th image slot (`is_image_bt`) replaced by `features_bkd[b, k]`."""
  slots = features_bkd.shape[1]
  index_bt = jnp.clip(jnp.cumsum(is_image_bt.astype(jnp.int32), axis=1) - 1, 0, slots - 1)
  picked_btd = jnp.take_along_axis(features_bkd, index_bt[..., None], axis=1)
  return jnp.where(is_image_bt[..., None], picked_btd.astype(x_btd.dtype), x_btd)


class Projector(nn.Module):
  """Encoder features [.., E] to the decoder's width [.., D]: one linear map (LLaVA), or linear,
  exact GELU, linear (LLaVA-1.5's `mlp2x_gelu`), with biases. Sharded as the decoder's MLP: the
  hidden width over `mlp`."""

  config: LlavaConfig

  @nn.compact
  def __call__(self, f_bse: jax.Array) -> jax.Array:
    cfg = self.config
    e, d, v = cfg.vision.dim, cfg.text.dim, _as_vision(cfg)
    if cfg.projector == "linear":
      return Dense("bse,ed->bsd", (e, d), ("mlp", "embed"), v, name="linear")(f_bse)
    h_bsd = Dense("bse,ed->bsd", (e, d), ("embed", "mlp"), v, name="linear_1")(f_bse)
    h_bsd = constrain(ACTIVATIONS["gelu"](h_bsd), ("act_batch", "act_seq", "act_mlp"))
    return Dense("bsf,fd->bsd", (d, d), ("mlp", "embed"), v, name="linear_2")(h_bsd)


def _as_vision(cfg: LlavaConfig) -> VisionConfig:
  """The projector computes in the decoder's dtypes."""
  return dataclasses.replace(cfg.vision, dtype=cfg.text.dtype, param_dtype=cfg.text.param_dtype)


class Llava(Transformer):
  """The decoder (`config` is `llava.text`) with a vision encoder and a projector."""

  llava: LlavaConfig | None = None

  def setup(self) -> None:
    super().setup()
    if self.llava is None or self.llava.text != self.config:
      raise ValueError("Llava(config=llava.text, llava=llava)")
    self.vision = VisionEncoder(self.llava.vision)
    self.projector = Projector(self.llava)

  def image_features(self, images_nyxc: jax.Array) -> jax.Array:
    """The projected features [N, S, D] of N images: the encoder's `feature_layer` hidden
    state, without the class token unless `feature_select` is "full"."""
    cfg = self.llava
    f_nse = self.vision(images_nyxc)[cfg.feature_index]
    if cfg.vision.class_token and cfg.feature_select == "patch":
      f_nse = f_nse[:, 1:]
    if self.is_initializing():  # The final norm is the encoder's, though LLaVA does not use it.
      self.vision.last_hidden(f_nse)
    return constrain(self.projector(f_nse), _ACT_BSD)

  def embed_images(
    self,
    tokens_bt: jax.Array,
    images_bmyxc: jax.Array,
    segment_ids_bt: jax.Array | None = None,
    *,
    deterministic: bool = True,
    neftune_alpha: float = 0.0,
  ) -> jax.Array:
    """The input vectors [B, T, D]: token embeddings, image features at the image tokens."""
    b, m = images_bmyxc.shape[:2]
    features_nsd = self.image_features(images_bmyxc.reshape(b * m, *images_bmyxc.shape[2:]))
    features_bkd = features_nsd.reshape(b, m * features_nsd.shape[1], features_nsd.shape[2])
    x_btd = self.embed(
      tokens_bt, segment_ids_bt, deterministic=deterministic, neftune_alpha=neftune_alpha
    )
    return constrain(splice(x_btd, tokens_bt == self.llava.image_token_id, features_bkd), _ACT_BSD)

  def __call__(
    self,
    tokens_bt: jax.Array | None = None,
    positions_bt: jax.Array | None = None,
    segment_ids_bt: jax.Array | None = None,
    *,
    images: jax.Array | None = None,
    deterministic: bool = True,
    neftune_alpha: float = 0.0,
    **kwargs: Any,
  ) -> jax.Array:
    """`Transformer.__call__`, with `images` [B, M, Y, X, C] in place of the image tokens."""
    if images is not None:
      kwargs["embeddings_btd"] = self.embed_images(
        tokens_bt,
        images,
        segment_ids_bt,
        deterministic=deterministic,
        neftune_alpha=neftune_alpha,
      )
      tokens_bt = None
    return super().__call__(
      tokens_bt,
      positions_bt,
      segment_ids_bt,
      deterministic=deterministic,
      neftune_alpha=neftune_alpha,
      **kwargs,
    )


def model(cfg: LlavaConfig, **kwargs: Any) -> Llava:
  return Llava(cfg.text, llava=cfg, **kwargs)


def init_fn(module: Llava, length: int | None = None, images: int = 1):
  """`rng -> variables` (boxed with logical names) of every part, for `sharding.init_sharded`."""
  cfg = module.llava
  v = cfg.vision
  length = length or cfg.image_tokens * images + 8

  def init(rng: jax.Array) -> Any:
    tokens = jnp.zeros((1, length), jnp.int32)
    pixels = jnp.zeros((1, images, v.image_size, v.image_size, v.channels))
    return module.init(rng, tokens, images=pixels)

  return init
