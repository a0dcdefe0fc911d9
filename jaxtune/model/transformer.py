"""The decoder: embeddings, a stack of blocks under `nn.scan` (with remat), and the output layer.

Shape letters: B batch, T length, D model dim, V vocab, L layers.

Inputs are token ids with optional `segment_ids` (packed sequences; 0 = padding) and positions
(default: restarting at each segment). Layer weights are stacked on a leading `layers` axis, and
so are the keys and values of the KV cache (see `attention.KVCache`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.config import ModelConfig, PeftConfig
from jaxtune.model.attention import (
  CACHE_AXES,
  CONTEXT,
  CONTEXT_LSE,
  Attention,
  KVCache,
  segment_positions,
)
from jaxtune.model.layers import Embed, Mlp, Norm, constrain, dropout, dtypes, weight
from jaxtune.peft import neftune
from jaxtune.peft import prefix as prefix_lib

_REMAT_POLICIES = {
  "full": None,  # Save nothing: recompute the whole block.
  "dots": jax.checkpoint_policies.checkpoint_dots,
  "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
  # The projections' outputs and the attention's output and log-sum-exp: recompute only the
  # norms, RoPE, activations and residual adds (elementwise work), not a matmul.
  "minimal": jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    jax.checkpoint_policies.save_only_these_names(CONTEXT, CONTEXT_LSE),
  ),
}

_ACT_BTD = ("act_batch", "act_seq", "act_embed")


class Block(nn.Module):
  """One layer: sequential (`x + attn(ln x)`, then `+ mlp(ln x)`) or PaLM parallel
  (`x + attn(ln x) + mlp(ln x)`), with residual dropout at this layer's rate."""

  config: ModelConfig
  deterministic: bool = True
  peft: PeftConfig = PeftConfig()
  adapters: int = 0

  @nn.compact
  def __call__(
    self,
    carry: tuple[jax.Array, KVCache | None],
    dropout_rate: jax.Array,
    layer: jax.Array,
    prefix_kv: tuple[jax.Array, jax.Array] | None,
    positions_bt: jax.Array,
    segment_ids_bt: jax.Array,
    adapter_ids_b: jax.Array | None,
  ) -> tuple[tuple[jax.Array, KVCache | None], None]:
    cfg = self.config
    x_btd, cache = carry

    def residual(y_btd):
      if self.deterministic or max(cfg.layer_dropout_rates) == 0.0:
        return y_btd
      return dropout(y_btd, dropout_rate, self.make_rng("dropout"))

    peft = dict(peft=self.peft, adapters=self.adapters, deterministic=self.deterministic)
    attn_module = Attention(cfg, **peft, name="attn")
    mlp_module = Mlp(cfg, **peft, name="mlp")

    def attn(h_btd):
      return attn_module(
        h_btd, positions_bt, segment_ids_bt, prefix_kv, adapter_ids_b, cache, layer
      )

    def mlp(h_btd):
      return mlp_module(h_btd, adapter_ids_b)

    if cfg.parallel_block:
      h_btd = Norm(cfg, name="norm")(x_btd)
      a_btd, cache = attn(h_btd)
      x_btd = x_btd + residual(a_btd + mlp(h_btd))
    else:
      a_btd, cache = attn(Norm(cfg, name="attn_norm")(x_btd))
      x_btd = x_btd + residual(a_btd)
      x_btd = x_btd + residual(mlp(Norm(cfg, name="mlp_norm")(x_btd)))
    return (constrain(x_btd, _ACT_BTD), cache), None


class Transformer(nn.Module):
  """A decoder-only language model returning float32 logits [B, T, V].

  `deterministic=False` turns on residual dropout ('dropout' rng) and, with `neftune_alpha` > 0,
  NEFTune noise on the token embeddings ('neftune' rng).

  `peft` adds the parameters of a PEFT method (see `jaxtune/peft/`): LoRA updates on the chosen
  projections, P prefix keys and values at every layer, or P soft-prompt embeddings before each
  row. With a prefix or a prompt, the tokens' positions start at P (the first P are theirs).
  `adapters` = M > 0 makes a bank of M adapters (LoRA or prefix), one chosen per row by
  `adapter_ids` [B].

  `decode=True` runs the tokens through the KV cache (the mutable 'cache' collection, made by
  `init_cache`): they attend to every token cached before them, and are cached in turn.
  """

  config: ModelConfig
  peft: PeftConfig = PeftConfig()
  adapters: int = 0

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
    adapter_ids: jax.Array | None = None,
  ) -> jax.Array:
    cfg, peft = self.config, self.peft
    if segment_ids_bt is None:
      segment_ids_bt = jnp.ones_like(tokens_bt, jnp.int32)
    if positions_bt is None:
      if decode:
        raise ValueError("decoding needs explicit positions")
      positions_bt = segment_positions(segment_ids_bt)
    if self.adapters and adapter_ids is None:
      raise ValueError(f"a model with a bank of {self.adapters} adapters needs adapter_ids")

    embed = Embed(cfg.vocab_size, cfg, name="embed")
    x_btd = embed(tokens_bt)
    if cfg.scale_embeddings:
      x_btd = x_btd * jnp.asarray(np.sqrt(cfg.dim), x_btd.dtype)
    if neftune_alpha and not deterministic:  # Training-time noise on the token embeddings.
      noise_btd = neftune.noise(self.make_rng("neftune"), segment_ids_bt, cfg.dim, neftune_alpha)
      x_btd = x_btd + noise_btd.astype(x_btd.dtype)

    prefix_kv, prompt = None, 0
    if peft.method == "prefix" and peft.prefix_length:
      prefix_kv = prefix_lib.Prefix(cfg, peft, self.adapters, name="prefix")(
        adapter_ids, tokens_bt.shape[0]
      )
      positions_bt = positions_bt + peft.prefix_length
    elif peft.method == "prompt" and peft.prompt_length:
      if decode:
        raise ValueError("decode with a prefix made by prefix.from_prompt, not the prompt itself")
      prompt = peft.prompt_length
      x_btd, positions_bt, segment_ids_bt = prefix_lib.prepend_prompt(
        weight(
          self,
          "prompt",
          nn.initializers.normal(1.0),
          (prompt, cfg.dim),
          ("prefix", "embed"),
          dtypes(cfg)[1],
        ),
        x_btd,
        positions_bt,
        segment_ids_bt,
      )
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
      variable_axes={"params": 0, "intermediates": 0},
      split_rngs={"params": True, "dropout": True},
      in_axes=(0, 0, 0, nn.broadcast, nn.broadcast, nn.broadcast),
      length=cfg.num_layers,
      metadata_params={nn.PARTITION_NAME: "layers"},
    )(cfg, deterministic, peft, self.adapters, name="layers")
    rates_l = jnp.asarray(cfg.layer_dropout_rates, jnp.float32)
    layers_l = jnp.arange(cfg.num_layers)
    cache = self._cache(segment_ids_bt) if decode else None
    (x_btd, cache), _ = layers(
      (x_btd, cache), rates_l, layers_l, prefix_kv, positions_bt, segment_ids_bt, adapter_ids
    )
    if decode:
      self._store(cache, segment_ids_bt.shape[1])
    x_btd = x_btd[:, prompt:]

    x_btd = Norm(cfg, name="final_norm")(x_btd)
    if cfg.tie_embeddings:
      logits_btv = embed.attend(x_btd)
      if cfg.scale_tied_logits:
        logits_btv = logits_btv / jnp.asarray(np.sqrt(cfg.dim), logits_btv.dtype)
    else:
      logits_btv = Embed(cfg.vocab_size, cfg, name="lm_head").attend(x_btd)
    return constrain(logits_btv.astype(jnp.float32), ("act_batch", "act_seq", "act_vocab"))

  def _cache(self, segment_ids_bt: jax.Array) -> KVCache:
    """The 'cache' collection as this pass's layers see it: the segment ids of its T tokens
    written at the index. The cache is created, sized by its first input, when the model is
    initialized with `decode=True` (see `init_cache`)."""
    cfg = self.config
    b, t = segment_ids_bt.shape
    shape = (cfg.num_layers, b, cfg.kv_heads, t, cfg.head_size)

    def variable(name, init, *args):
      return constrain(self.variable("cache", name, init, *args).value, CACHE_AXES[name])

    key_lbksh = variable("key", jnp.zeros, shape, dtypes(cfg)[0])
    value_lbksh = variable("value", jnp.zeros, shape, dtypes(cfg)[0])
    segment_ids_bs = variable("segment_ids", jnp.zeros, (b, t), jnp.int32)
    offset = variable("index", lambda: jnp.zeros((), jnp.int32))
    segment_ids_bs = jax.lax.dynamic_update_slice(
      segment_ids_bs, segment_ids_bt.astype(jnp.int32), (0, offset)
    )
    return KVCache(key_lbksh, value_lbksh, segment_ids_bs, offset)

  def _store(self, cache: KVCache, t: int) -> None:
    """Keeps what the layers wrote and moves the index past the T new tokens."""
    self.put_variable("cache", "key", cache.key_lbksh)
    self.put_variable("cache", "value", cache.value_lbksh)
    self.put_variable("cache", "segment_ids", cache.segment_ids_bs)
    self.put_variable("cache", "index", cache.offset + t)


def _adapter_ids(model: Transformer, batch: int) -> dict[str, jax.Array]:
  return {"adapter_ids": jnp.zeros((batch,), jnp.int32)} if model.adapters else {}


def init_fn(model: Transformer, length: int = 8):
  """`rng -> variables` (boxed with logical names), for `sharding.init_sharded`."""

  def init(rng: jax.Array) -> Any:
    return model.init(rng, jnp.zeros((1, length), jnp.int32), **_adapter_ids(model, 1))

  return init


def init_cache(model: Transformer, batch: int, max_length: int) -> Any:
  """An empty KV cache for `batch` sequences of up to `max_length` tokens: keys and values
  [L, B, K, S, H], segment ids [B, S] and the index of the next free slot."""
  tokens = jnp.zeros((batch, max_length), jnp.int32)
  ids = _adapter_ids(model, batch)
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), tokens, tokens, decode=True, **ids)["cache"]
  )
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


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
