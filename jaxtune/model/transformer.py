"""The decoder: embeddings, a stack of blocks under `nn.scan` (with remat), and the output layer.

Shape letters: B batch, T length, D model dim, V vocab, L layers.

Inputs are token ids with optional `segment_ids` (packed sequences; 0 = padding) and positions
(default: restarting at each segment). Layer weights are stacked on a leading `layers` axis.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.config import ModelConfig
from jaxtune.model.attention import Attention, segment_positions
from jaxtune.model.layers import Embed, Mlp, Norm, constrain, dropout
from jaxtune.peft import neftune

_REMAT_POLICIES = {
  "full": None,  # Save nothing: recompute the whole block.
  "dots": jax.checkpoint_policies.checkpoint_dots,
  "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}

_ACT_BTD = ("act_batch", "act_seq", "act_embed")


class Block(nn.Module):
  """One layer: sequential (`x + attn(ln x)`, then `+ mlp(ln x)`) or PaLM parallel
  (`x + attn(ln x) + mlp(ln x)`), with residual dropout at this layer's rate."""

  config: ModelConfig
  deterministic: bool = True
  decode: bool = False

  @nn.compact
  def __call__(
    self,
    x_btd: jax.Array,
    dropout_rate: jax.Array,
    positions_bt: jax.Array,
    segment_ids_bt: jax.Array,
  ) -> tuple[jax.Array, None]:
    cfg = self.config

    def residual(y_btd):
      if self.deterministic or max(cfg.layer_dropout_rates) == 0.0:
        return y_btd
      return dropout(y_btd, dropout_rate, self.make_rng("dropout"))

    attn = Attention(cfg, decode=self.decode, name="attn")
    if cfg.parallel_block:
      h_btd = Norm(cfg, name="norm")(x_btd)
      y_btd = attn(h_btd, positions_bt, segment_ids_bt) + Mlp(cfg, name="mlp")(h_btd)
      x_btd = x_btd + residual(y_btd)
    else:
      x_btd = x_btd + residual(
        attn(Norm(cfg, name="attn_norm")(x_btd), positions_bt, segment_ids_bt)
      )
      x_btd = x_btd + residual(Mlp(cfg, name="mlp")(Norm(cfg, name="mlp_norm")(x_btd)))
    return constrain(x_btd, _ACT_BTD), None


class Transformer(nn.Module):
  """A decoder-only language model returning float32 logits [B, T, V].

  `deterministic=False` turns on residual dropout ('dropout' rng) and, with `neftune_alpha` > 0,
  NEFTune noise on the token embeddings ('neftune' rng).
  """

  config: ModelConfig

  @nn.compact
  def __call__(
    self,
    tokens_bt: jax.Array,
    positions_bt: jax.Array | None = None,
    segment_ids_bt: jax.Array | None = None,
    *,
    deterministic: bool = True,
    decode: bool = False,
    neftune_alpha: float = 0.0,
  ) -> jax.Array:
    cfg = self.config
    if segment_ids_bt is None:
      segment_ids_bt = jnp.ones_like(tokens_bt, jnp.int32)
    if positions_bt is None:
      if decode:
        raise ValueError("decoding needs explicit positions")
      positions_bt = segment_positions(segment_ids_bt)

    embed = Embed(cfg.vocab_size, cfg, name="embed")
    x_btd = embed(tokens_bt)
    if cfg.scale_embeddings:
      x_btd = x_btd * jnp.asarray(np.sqrt(cfg.dim), x_btd.dtype)
    if neftune_alpha and not deterministic:  # Training-time noise on the token embeddings.
      noise_btd = neftune.noise(self.make_rng("neftune"), segment_ids_bt, cfg.dim, neftune_alpha)
      x_btd = x_btd + noise_btd.astype(x_btd.dtype)
    if cfg.position == "learned":
      x_btd = x_btd + Embed(cfg.max_seq_len, cfg, ("position", "embed"), name="position")(
        positions_bt
      )
    x_btd = constrain(x_btd, _ACT_BTD)

    block = Block
    if cfg.remat != "none":
      block = nn.remat(block, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
    layers = nn.scan(
      block,
      variable_axes={"params": 0, "cache": 0},
      split_rngs={"params": True, "dropout": True},
      in_axes=(0, nn.broadcast, nn.broadcast),
      length=cfg.num_layers,
      metadata_params={nn.PARTITION_NAME: "layers"},
    )(cfg, deterministic, decode, name="layers")
    rates_l = jnp.asarray(cfg.layer_dropout_rates, jnp.float32)
    x_btd, _ = layers(x_btd, rates_l, positions_bt, segment_ids_bt)

    x_btd = Norm(cfg, name="final_norm")(x_btd)
    if cfg.tie_embeddings:
      logits_btv = embed.attend(x_btd)
      if cfg.scale_tied_logits:
        logits_btv = logits_btv / jnp.asarray(np.sqrt(cfg.dim), logits_btv.dtype)
    else:
      logits_btv = Embed(cfg.vocab_size, cfg, name="lm_head").attend(x_btd)
    return constrain(logits_btv.astype(jnp.float32), ("act_batch", "act_seq", "act_vocab"))


def init_fn(model: Transformer, length: int = 8):
  """`rng -> variables` (boxed with logical names), for `sharding.init_sharded`."""

  def init(rng: jax.Array) -> Any:
    return model.init(rng, jnp.zeros((1, length), jnp.int32))

  return init


def init_cache(model: Transformer, batch: int, max_length: int) -> Any:
  """An empty KV cache for `batch` sequences of up to `max_length` tokens."""
  tokens = jnp.zeros((batch, max_length), jnp.int32)
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), tokens, tokens, decode=True)["cache"]
  )
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def param_count(params: Any) -> int:
  """Number of parameters in a (possibly abstract) tree."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def grow_vocab(params: Any, vocab_size: int) -> Any:
  """Params with the embedding (and untied output layer) grown to `vocab_size` rows, for special
  tokens added to the tokenizer (e.g. LIMA's EOT). New rows are the mean of the old ones, so
  the new tokens start as an average token and the logits of the old tokens do not change."""

  def grow(table_vd):
    extra = vocab_size - table_vd.shape[0]
    if extra < 0:
      raise ValueError(f"cannot shrink the vocabulary from {table_vd.shape[0]} to {vocab_size}")
    mean_d = jnp.mean(table_vd, axis=0, keepdims=True)
    return jnp.concatenate([table_vd, jnp.repeat(mean_d, extra, axis=0)], axis=0)

  grown = dict(params)
  for name in ("embed", "lm_head"):
    if name in grown:
      grown[name] = {"embedding": grow(grown[name]["embedding"])}
  return grown
