"""The decoder in three parts: `embed` (tokens to vectors), `decode` (vectors to hidden states,
through a stack of blocks under `nn.scan` with remat, with an optional KV cache) and the heads
(`logits`, and `score`: a scalar per token, for reward and value models).

Shape letters: B batch, T length, D model dim, V vocab, L layers.

Inputs are token ids, or vectors a caller built (image features spliced in place of placeholder
tokens), with optional `segment_ids` (packed sequences; 0 = padding) and positions (default:
restarting at each segment). Layer weights are stacked on a leading `layers` axis. The KV cache
holds one key and one value array per layer (see `attention.KVCache`): a pass through the cache
(prefill, a decoding step) runs the layers unrolled, each with its own weights and cache arrays.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.config_model import ModelConfig
from jaxtune.model import neftune
from jaxtune.model.adapters import NONE, PREFIX, PROMPT, Adapters
from jaxtune.model.attention import (
  CONTEXT,
  CONTEXT_LSE,
  Attention,
  KVCache,
  cache_axes,
  segment_positions,
)
from jaxtune.model.heads import ScalarHead
from jaxtune.model.layers import Embed, Norm, constrain, dropout, dtypes, weight
from jaxtune.model.mlp import Mlp
from jaxtune.model.prefix import Prefix, prepend_prompt

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
HEADS = ("logits", "hidden", "score")  # What `Transformer.__call__` returns, by `head=`.


@flax.struct.dataclass
class LayerInputs:
  """What differs per layer: scanned over (leading [L] axis)."""

  dropout_rate: jax.Array  # [L] residual dropout rates.
  prefix_kv: tuple[jax.Array, jax.Array] | None  # Prefix keys, values: [L, B, P, K, H] each.


@flax.struct.dataclass
class SharedInputs:
  """What every layer sees alike: broadcast over the scan."""

  positions_bt: jax.Array
  segment_ids_bt: jax.Array
  adapter_ids_b: jax.Array | None
  deterministic: bool = flax.struct.field(pytree_node=False, default=True)


class Block(nn.Module):
  """One layer: sequential (`x + attn(ln x)`, then `+ mlp(ln x)`) or PaLM parallel
  (`x + attn(ln x) + mlp(ln x)`), with residual dropout at this layer's rate.

  Called under `nn.scan` as `(carry, per_layer, shared)`, with `in_axes=(0, nn.broadcast)`."""

  config: ModelConfig
  adapters: Adapters = NONE

  @nn.compact
  def __call__(
    self, carry: tuple[jax.Array, KVCache | None], per_layer: LayerInputs, shared: SharedInputs
  ) -> tuple[tuple[jax.Array, KVCache | None], None]:
    cfg, deterministic = self.config, shared.deterministic
    x_btd, cache = carry

    def residual(y_btd):
      if deterministic or max(cfg.layer_dropout_rates) == 0.0:
        return y_btd
      return dropout(y_btd, per_layer.dropout_rate, self.make_rng("dropout"))

    attn_module = Attention(cfg, self.adapters, deterministic, name="attn")
    mlp_module = Mlp(cfg, self.adapters, deterministic, name="mlp")

    def attn(h_btd):
      return attn_module(
        h_btd,
        shared.positions_bt,
        shared.segment_ids_bt,
        prefix_kv=per_layer.prefix_kv,
        adapter_ids_b=shared.adapter_ids_b,
        cache=cache,
      )

    def mlp(h_btd):
      return mlp_module(h_btd, shared.adapter_ids_b)

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
  """A decoder-only language model: `__call__` gives float32 logits [B, T, V] of token ids.

  `deterministic=False` turns on residual dropout ('dropout' rng) and, with `neftune_alpha` > 0,
  NEFTune noise on the token embeddings ('neftune' rng).

  `adapters` adds the layers of parameter-efficient fine-tuning (see `model/adapters.py`): LoRA
  updates on the chosen projections, P prefix keys and values at every layer, or P soft-prompt
  embeddings before each row. With a prefix or a prompt, the tokens' positions start at P (the
  first P are theirs). A bank (`adapters.bank` = M > 0) chooses one per row by `adapter_ids` [B].

  `scalar_head` adds the `score` head (a reward model's or a value function's linear map of each
  hidden state to a number).

  `decode=True` runs the inputs through the KV cache (the mutable 'cache' collection, made by
  `init_cache`): they attend to every token cached before them, and are cached in turn.
  """

  config: ModelConfig
  adapters: Adapters = NONE
  scalar_head: bool = False
  scalar_bias: bool = False  # The scalar head's offset (a reward model's).

  def setup(self) -> None:
    cfg = self.config
    self.token_embedding = Embed(cfg.vocab_size, cfg, name="embed")
    self.final_norm = Norm(cfg, name="final_norm")
    if not cfg.tie_embeddings:
      self.lm_head = Embed(cfg.vocab_size, cfg, name="lm_head")
    if self.scalar_head:
      self.score_head = ScalarHead(cfg, self.scalar_bias, name="score")

  def __call__(
    self,
    tokens_bt: jax.Array | None = None,
    positions_bt: jax.Array | None = None,
    segment_ids_bt: jax.Array | None = None,
    *,
    embeddings_btd: jax.Array | None = None,
    head: str = "logits",
    deterministic: bool = True,
    decode: bool = False,
    neftune_alpha: float = 0.0,
    adapter_ids: jax.Array | None = None,
  ) -> jax.Array:
    """`head` of the tokens (or of `embeddings_btd`, vectors in place of `embed(tokens)`):
    "logits" [B, T, V] float32, "hidden" (the final-normed hidden states [B, T, D]) or "score"
    [B, T] float32."""
    if (tokens_bt is None) == (embeddings_btd is None):
      raise ValueError("pass either tokens or embeddings")
    if head not in HEADS:
      raise ValueError(f"head={head!r}: choose among {list(HEADS)}")
    if embeddings_btd is None:
      embeddings_btd = self.embed(
        tokens_bt, segment_ids_bt, deterministic=deterministic, neftune_alpha=neftune_alpha
      )
    h_btd = self.decode(
      embeddings_btd,
      positions_bt,
      segment_ids_bt,
      deterministic=deterministic,
      cache=decode,
      adapter_ids=adapter_ids,
    )
    if self.is_initializing() and self.scalar_head:
      self.score(h_btd)  # Creates the head's parameters whatever head is asked for.
    return {"logits": self.logits, "hidden": lambda h: h, "score": self.score}[head](h_btd)

  def embed(
    self,
    tokens_bt: jax.Array,
    segment_ids_bt: jax.Array | None = None,
    *,
    deterministic: bool = True,
    neftune_alpha: float = 0.0,
  ) -> jax.Array:
    """The input vectors [B, T, D] of token ids (scaled for Gemma), with NEFTune's noise when
    training; `segment_ids_bt` gives each packed example its own noise scale."""
    cfg = self.config
    x_btd = self.token_embedding(tokens_bt)
    if cfg.scale_embeddings:
      x_btd = x_btd * jnp.asarray(np.sqrt(cfg.dim), x_btd.dtype)
    if neftune_alpha and not deterministic:
      if segment_ids_bt is None:
        segment_ids_bt = jnp.ones_like(tokens_bt, jnp.int32)
      noise_btd = neftune.noise(self.make_rng("neftune"), segment_ids_bt, cfg.dim, neftune_alpha)
      x_btd = x_btd + noise_btd.astype(x_btd.dtype)
    return x_btd

  @nn.compact
  def decode(
    self,
    x_btd: jax.Array,
    positions_bt: jax.Array | None = None,
    segment_ids_bt: jax.Array | None = None,
    *,
    deterministic: bool = True,
    cache: bool = False,
    adapter_ids: jax.Array | None = None,
  ) -> jax.Array:
    """The final-normed hidden states [B, T, D] of input vectors [B, T, D]: a prefix or a soft
    prompt added, the layers run (through the KV cache with `cache`)."""
    cfg, adapters = self.config, self.adapters
    b, t = x_btd.shape[:2]
    if segment_ids_bt is None:
      segment_ids_bt = jnp.ones((b, t), jnp.int32)
    if positions_bt is None:
      if cache:
        raise ValueError("decoding needs explicit positions")
      positions_bt = segment_positions(segment_ids_bt)
    if adapters.bank and adapter_ids is None:
      raise ValueError(f"a model with a bank of {adapters.bank} adapters needs adapter_ids")

    prefix_kv, prompt = None, adapters.prompt_length
    if adapters.prefix_length:
      prefix_kv = Prefix(cfg, adapters, name=PREFIX)(adapter_ids, b)
      positions_bt = positions_bt + adapters.prefix_length
    elif prompt:
      if cache:
        raise ValueError("decode with a prefix made by prefix.from_prompt, not the prompt itself")
      prompt_pd = weight(
        self,
        PROMPT,
        nn.initializers.normal(1.0),
        (prompt, cfg.dim),
        ("prefix", "embed"),
        dtypes(cfg)[1],
      )
      x_btd, positions_bt, segment_ids_bt = prepend_prompt(
        prompt_pd, x_btd, positions_bt, segment_ids_bt
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
      in_axes=(0, nn.broadcast),
      length=cfg.num_layers,
      metadata_params={nn.PARTITION_NAME: "layers"},
    )(cfg, adapters, name="layers")
    per_layer = LayerInputs(
      dropout_rate=jnp.asarray(cfg.layer_dropout_rates, jnp.float32), prefix_kv=prefix_kv
    )
    shared = SharedInputs(positions_bt, segment_ids_bt, adapter_ids, deterministic)
    if cache and not self.is_initializing():
      x_btd = self._through_cache(x_btd, per_layer, shared)
    else:  # Training, scoring; and creating the weights (and the cache) at init.
      (x_btd, _), _ = layers((x_btd, None), per_layer, shared)
      if cache:
        self._cache(segment_ids_bt)
    return self.final_norm(x_btd[:, prompt:])

  def _through_cache(
    self, x_btd: jax.Array, per_layer: LayerInputs, shared: SharedInputs
  ) -> jax.Array:
    """The layers run one after the other (unrolled, not scanned), layer l with its slice of
    the stacked weights and its own cache arrays, which it updates in place. (Scanned, the
    cache would be one stacked array and each layer's part would be sliced out, a copy, before
    its products read it.) The weights are stacked [L, ...] or, split by `unstack_layers`
    before a decoding loop, already one tree per layer."""
    caches = self._cache(shared.segment_ids_bt)
    weights = {
      col: nn.meta.unbox(tree["layers"])
      for col, tree in self.variables.items()
      if col not in ("cache", "intermediates") and "layers" in tree
    }
    block = Block(self.config, self.adapters)
    for layer, cache in enumerate(caches):
      this_layer = functools.partial(lambda x, i: x[i], i=layer)
      (x_btd, caches[layer]), _ = block.apply(
        {
          col: tree[layer] if isinstance(tree, tuple) else jax.tree.map(this_layer, tree)
          for col, tree in weights.items()
        },
        (x_btd, cache),
        jax.tree.map(this_layer, per_layer),
        shared,
      )
    self._store(caches, shared.segment_ids_bt.shape[1])
    return x_btd

  def logits(self, h_btd: jax.Array) -> jax.Array:
    """Float32 logits [B, T, V] of hidden states: the output layer, tied to the embedding
    table or not."""
    cfg = self.config
    if cfg.tie_embeddings:
      logits_btv = self.token_embedding.attend(h_btd)
      if cfg.scale_tied_logits:
        logits_btv = logits_btv / jnp.asarray(np.sqrt(cfg.dim), logits_btv.dtype)
    else:
      logits_btv = self.lm_head.attend(h_btd)
    return constrain(logits_btv.astype(jnp.float32), ("act_batch", "act_seq", "act_vocab"))

  def score(self, h_btd: jax.Array) -> jax.Array:
    """A float32 number [B, T] per hidden state (needs `scalar_head`)."""
    if not self.scalar_head:
      raise ValueError("this model has no scalar head (Transformer(..., scalar_head=True))")
    return self.score_head(h_btd)

  def _cache(self, segment_ids_bt: jax.Array) -> list[KVCache]:
    """The 'cache' collection as each layer sees it: the segment ids of this pass's T tokens
    written at the index. The cache is created, sized by its first input, when the model is
    initialized with `decode=True` (see `init_cache`)."""
    cfg = self.config
    b, t = segment_ids_bt.shape
    heads = () if cfg.kv_heads == 1 else (cfg.kv_heads,)  # See `KVCache`.
    shape, dtype = (b, *heads, t, cfg.head_size), dtypes(cfg)[0]

    def variable(name, init, *args):
      value = self.variable("cache", name, init, *args).value
      return jax.tree.map(lambda x: constrain(x, cache_axes(name, x.ndim)), value)

    def per_layer():
      return tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))

    keys, values = variable("key", per_layer), variable("value", per_layer)
    segment_ids_bs = variable("segment_ids", jnp.zeros, (b, t), jnp.int32)
    offset = variable("index", lambda: jnp.zeros((), jnp.int32))
    segment_ids_bs = jax.lax.dynamic_update_slice(
      segment_ids_bs, segment_ids_bt.astype(jnp.int32), (0, offset)
    )
    return [
      KVCache(k_bksh, v_bksh, segment_ids_bs, offset)
      for k_bksh, v_bksh in zip(keys, values, strict=True)
    ]

  def _store(self, caches: list[KVCache], t: int) -> None:
    """Keeps what the layers wrote and moves the index past the T new tokens."""
    self.put_variable("cache", "key", tuple(c.key for c in caches))
    self.put_variable("cache", "value", tuple(c.value for c in caches))
    self.put_variable("cache", "segment_ids", caches[0].segment_ids_bs)
    self.put_variable("cache", "index", caches[0].offset + t)


def _adapter_ids(model: Transformer, batch: int) -> dict[str, jax.Array]:
  return {"adapter_ids": jnp.zeros((batch,), jnp.int32)} if model.adapters.bank else {}


def init_fn(model: Transformer, length: int = 8):
  """`rng -> variables` (boxed with logical names), for `sharding.init_sharded`."""

  def init(rng: jax.Array) -> Any:
    return model.init(rng, jnp.zeros((1, length), jnp.int32), **_adapter_ids(model, 1))

  return init


def unstack_layers(params: Any) -> Any:
  """`params` with the layers' weights as a tuple of L trees, one per layer, in place of the
  stacked [L, ...] arrays: for a loop of decoding steps, which then reads each layer's weights
  where they lie (XLA does not hoist the slices out of the loop: it would copy every weight at
  every step). Only a pass through the KV cache (`decode=True`) takes them."""
  layers = nn.meta.unbox(params["layers"])
  count = jax.tree.leaves(layers)[0].shape[0]
  return {
    **params,
    "layers": tuple(jax.tree.map(lambda x, i=i: x[i], layers) for i in range(count)),
  }


def init_cache(model: Transformer, batch: int, max_length: int) -> Any:
  """An empty KV cache for `batch` sequences of up to `max_length` tokens: keys and values (a
  tuple of L arrays [B, K, S, H] each; [B, S, H] for one KV head), segment ids [B, S] and the
  index of the next free slot."""
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


def training_rngs(rng: jax.Array | None) -> dict[str, jax.Array] | None:
  """The rngs of a training pass (dropout, NEFTune's noise) drawn from one key; None: none (a
  deterministic pass)."""
  if rng is None:
    return None
  return dict(zip(("dropout", "neftune"), jax.random.split(rng), strict=True))
