"""Sampling with the KV cache: one jitted prefill, then one compiled decode loop.

Shape letters: B batch, T prompt slots, S cache slots, O new tokens (outputs), V vocab.

Prompts of different lengths share a batch by left padding: row b's prompt fills the last n_b of
the P prompt slots, padding carries segment id 0 (no query attends to it) and positions count
from the row's first real token, so each row computes what it would compute alone. Every row's
next token then goes into the same cache slot. The batch is padded to a multiple of the mesh's
data axis (with copies of its first prompt) and sharded over it like training batches, with the
cache sharded over batch and KV heads.

Each token is chosen by `sampling.pick` (ids past the tokenizer's `vocab_size` never; penalty,
greedy or temperature / top-k / top-p). Row b
draws with `fold_in(fold_in(key(seed), i_b), step)`, where
i_b is its prompt's index in the call, so a sample does not depend on the batch it was drawn in.

Stop ids (EOS, a template's end-of-turn token) end a row inside the loop, and the loop ends when
every row has stopped. Stop strings are looked for in the decoded text on the host (`cut_at_stop`).
`stream` runs the same compiled loop one token at a time, for a chat that prints as it goes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxtune import sharding
from jaxtune.data import templates
from jaxtune.errors import ConfigError, GenerationError
from jaxtune.model import transformer
from jaxtune.model.attention import cache_axes
from jaxtune.sampling import Sampling, pick

_DEFAULT = Sampling()  # Greedy, 256 new tokens.
_SLOT_BUCKET = 32  # Prompt slots are rounded up to a multiple of this, to reuse compilations.


@dataclasses.dataclass(frozen=True)
class Completion:
  ids: list[int]  # The new tokens, without the stop id.
  finish: str  # "stop" (a stop id) or "length" (max_new_tokens or the model's positions).


# The engine.


@flax.struct.dataclass
class _State:
  cache: Any
  tokens_bo: jax.Array  # New tokens so far (entries past a row's stop id are meaningless).
  positions_b: jax.Array  # Position of the last new token: the next one fed to the model.
  seen_bv: jax.Array | None  # Tokens of the prompt and output (for the repetition penalty).
  done_b: jax.Array  # The row has produced a stop id.
  step: jax.Array  # Tokens produced.
  rows_b: jax.Array  # Index of each row's prompt in the call (its sampling key).
  seed: jax.Array


def _keys(seed: jax.Array, rows_b: jax.Array, step: jax.Array) -> jax.Array:
  root = jax.random.key(seed)
  return jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(root, i), step))(rows_b)


def _constrain_cache(cache: dict[str, Any]) -> dict[str, Any]:
  """The cache's arrays (keys and values: one per layer) constrained to their logical axes."""
  return {
    name: jax.tree.map(lambda x, n=name: nn.with_logical_constraint(x, cache_axes(n, x.ndim)), tree)
    for name, tree in cache.items()
  }


@functools.cache
def _compiled(model: transformer.Transformer, sampling: Sampling, stop_ids: tuple[int, ...]):
  """(prefill, decode), jitted; each compiles once per batch and cache shape."""
  stops = np.asarray(stop_ids, np.int32)

  def advance(state: _State, logits_bv: jax.Array, cache: Any) -> _State:
    token_b = pick(logits_bv, state.seen_bv, sampling, _keys(state.seed, state.rows_b, state.step))
    seen_bv = state.seen_bv
    if seen_bv is not None:
      seen_bv = seen_bv.at[jnp.arange(token_b.shape[0]), token_b].set(True)
    return state.replace(
      cache=_constrain_cache(cache),
      tokens_bo=state.tokens_bo.at[:, state.step].set(token_b),
      seen_bv=seen_bv,
      done_b=state.done_b | jnp.isin(token_b, stops),
      step=state.step + 1,
    )

  def prefill(
    params, tokens_bt, positions_bt, segments_bt, rows_b, seed, images, cache_len, samples
  ):
    """The prompts' forward pass; with `samples` > 1 each prompt's cache, last logits and
    positions are then repeated for its samples (rows_b: one entry per sample)."""
    cache = _constrain_cache(transformer.init_cache(model, tokens_bt.shape[0], cache_len))
    hidden_btd, mutated = model.apply(
      {"params": params, "cache": cache},
      tokens_bt,
      positions_bt,
      segments_bt,
      head="hidden",
      decode=True,
      mutable=["cache"],
      **({} if images is None else {"images": images}),
    )
    # The output layer at the last position only (prompts end there, left-padded): XLA computed
    # every position's logits otherwise, [B, T, V] float32 (4 GB for 64 prompts of 512 tokens
    # and a vocabulary of 32000), to keep one of them.
    logits_bv = model.apply({"params": params}, hidden_btd[:, -1:], method="logits")[:, 0]
    cache = mutated["cache"]
    if samples > 1:  # Each prompt's samples share its prefill: repeat its rows.
      cache = {
        name: jax.tree.map(lambda x: jnp.repeat(x, samples, axis=0), tree)
        if name != "index"
        else tree
        for name, tree in cache.items()
      }
      logits_bv, tokens_bt, positions_bt, segments_bt = (
        jnp.repeat(x, samples, axis=0) for x in (logits_bv, tokens_bt, positions_bt, segments_bt)
      )
    b = tokens_bt.shape[0]
    seen_bv = None
    if sampling.repetition_penalty != 1.0:
      seen_bv = jnp.zeros((b, logits_bv.shape[-1]), bool)
      seen_bv = seen_bv.at[jnp.arange(b)[:, None], tokens_bt].max(segments_bt != 0)
    state = _State(
      cache=None,
      tokens_bo=jnp.zeros((b, sampling.max_new_tokens), jnp.int32),
      positions_b=positions_bt[:, -1] + 1,
      seen_bv=seen_bv,
      done_b=jnp.zeros((b,), bool),
      step=jnp.zeros((), jnp.int32),
      rows_b=rows_b,
      seed=seed,
    )
    return advance(state, logits_bv, cache)

  def decode(params, state: _State, limit):
    """Produces tokens until `limit` tokens are out or every row has stopped."""
    params = transformer.unstack_layers(params)  # Once, outside the loop.

    def step(s: _State) -> _State:
      token_b = jax.lax.dynamic_index_in_dim(s.tokens_bo, s.step - 1, axis=1, keepdims=False)
      logits_b1v, mutated = model.apply(
        {"params": params, "cache": s.cache},
        token_b[:, None],
        s.positions_b[:, None],
        jnp.ones_like(token_b[:, None]),
        decode=True,
        mutable=["cache"],
      )
      return advance(s.replace(positions_b=s.positions_b + 1), logits_b1v[:, -1], mutated["cache"])

    state = jax.lax.while_loop(lambda s: (s.step < limit) & ~jnp.all(s.done_b), step, state)
    # Replicated, so that every process can read all of them.
    return state, nn.with_logical_constraint(state.tokens_bo, (None, None))

  return (
    jax.jit(prefill, static_argnames=("cache_len", "samples")),
    jax.jit(decode, donate_argnames="state"),
  )


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Sizes of one batch: prompt slots, cache slots and how many tokens fit."""

  slots: int
  cache_len: int
  steps: int


def _plan(lengths: Sequence[int], max_new_tokens: int, max_seq_len: int) -> _Plan:
  longest = max(lengths)
  if min(lengths) == 0:
    raise GenerationError("an empty prompt: it needs at least one token (e.g. BOS)")
  if longest >= max_seq_len:
    raise GenerationError(
      f"a prompt of {longest} tokens leaves no room in the model's {max_seq_len} positions"
    )
  slots = -(-longest // _SLOT_BUCKET) * _SLOT_BUCKET
  if slots + max_new_tokens - 1 > max_seq_len:  # Too long: no bucket (every slot counts).
    slots = longest
  # Token t > 0 needs token t - 1 in slot `slots + t - 1`; positions stay below max_seq_len.
  cache_len = min(slots + max_new_tokens - 1, max_seq_len)
  return _Plan(slots, cache_len, min(max_new_tokens, cache_len - slots + 1))


def free_memory(devices: Sequence[jax.Device]) -> tuple[int, str] | None:
  """(bytes, where) that a new array may take: the least free of `devices` (an accelerator's
  limit less what is in use), or, on CPU, the host's available memory; None if unknown."""
  stats = [d.memory_stats() for d in devices]
  if stats and all(st and "bytes_limit" in st for st in stats):
    free = min(st["bytes_limit"] - st.get("bytes_in_use", 0) for st in stats)
    return free, f"each {devices[0].device_kind} device"
  try:
    with open("/proc/meminfo") as f:
      info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024, "the host"
  except (OSError, KeyError, ValueError):
    try:
      return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "the host"
    except (OSError, ValueError, AttributeError):
      return None


@functools.cache
def _cache_bytes(model: transformer.Transformer, batch: int, cache_len: int) -> int:
  shapes = jax.eval_shape(lambda: transformer.init_cache(model, batch, cache_len))
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(shapes))


def _check_cache_fits(model, plan: _Plan, batch: int, mesh: jax.sharding.Mesh | None) -> None:
  """Refuses a batch whose KV cache cannot fit in memory, saying how many new tokens would."""
  devices = list(mesh.devices.flat) if mesh is not None else jax.local_devices()[:1]
  free = free_memory(devices)
  if free is None:
    return
  on_host = devices[0].platform == "cpu"  # CPU devices share the host's memory.
  shards = 1 if on_host or mesh is None else mesh.shape[sharding.DATA]  # The batch is split.
  need = (_cache_bytes(model, batch, plan.cache_len) + batch * plan.steps * 4) / shards
  if need <= free[0]:
    return
  per_slot = need / plan.cache_len  # Nearly all of it grows with the cache's slots.
  fit = int(free[0] // per_slot) - plan.slots + 1
  gib = 2**30
  advice = (
    f"about max_new_tokens={fit} fits with {batch} prompts a batch"
    if fit >= 1
    else "not even the prompts fit: use fewer prompts a batch"
  )
  raise GenerationError(
    f"the KV cache of {batch} prompts x {plan.cache_len} positions needs {need / gib:.1f} GiB, "
    f"but {free[0] / gib:.1f} GiB is free on {free[1]}: {advice}"
  )


class _Run:
  """One batch of prompts on the way: prefilled, then decoded by `advance`. With `samples` K,
  each prompt is prefilled once and decoded K times: sample j of the prompt of index i draws
  as row i * K + j of a call would (`rows` are the prompts' indices i)."""

  def __init__(
    self,
    model,
    params,
    prompts,
    rows,
    sampling,
    stop_ids,
    seed,
    mesh,
    rules,
    *,
    images,
    samples=1,
  ):
    self.model, self.params, self.mesh, self.rules = model, params, mesh, rules
    self.count = len(prompts) * samples
    self.prefill, self.decode = _compiled(model, sampling, tuple(stop_ids))
    self.plan = _plan([len(p) for p in prompts], sampling.max_new_tokens, model.config.max_seq_len)
    data = 1 if mesh is None else mesh.shape[sharding.DATA]
    padded = -(-len(prompts) // data) * data
    _check_cache_fits(model, self.plan, padded * samples, mesh)
    prompts = list(prompts) + [prompts[0]] * (padded - len(prompts))
    rows = [
      r * samples + j for r in list(rows) + [rows[0]] * (padded - len(rows)) for j in range(samples)
    ]
    rows = np.asarray(rows, np.int32)
    tokens_bt, positions_bt, segments_bt = (
      np.zeros((padded, self.plan.slots), np.int32) for _ in range(3)
    )
    for b, prompt in enumerate(prompts):
      n = len(prompt)
      tokens_bt[b, -n:], segments_bt[b, -n:], positions_bt[b, -n:] = prompt, 1, np.arange(n)
    if images is not None:
      images = _stack_images(list(images) + [images[0]] * (padded - len(images)))
      images = sharding.put_global(images, mesh, rules, ("act_batch", None, None, None, None))
    with sharding.use(mesh, rules):
      arrays = [
        sharding.put_global(x, mesh, rules, ("act_batch", "act_seq"))
        for x in (tokens_bt, positions_bt, segments_bt)
      ]
      self.state = self.prefill(
        params,
        *arrays,
        sharding.put_global(rows, mesh, rules, ("act_batch",)),
        np.uint32(seed),
        images,
        cache_len=self.plan.cache_len,
        samples=samples,
      )

  def advance(self, limit: int) -> np.ndarray:
    """Decodes up to `limit` tokens in all; returns the tokens [count, produced]."""
    with sharding.use(self.mesh, self.rules):
      self.state, tokens_bo = self.decode(self.params, self.state, np.int32(limit))
    return np.asarray(tokens_bo)[: self.count, : int(self.state.step)]


def _stack_images(images: Sequence[np.ndarray]) -> np.ndarray:
  """Each prompt's images [M_b, Y, X, C] as one array [B, M, Y, X, C], zeros after a row's own."""
  shapes = {x.shape[1:] for x in images if len(x)}
  if len(shapes) != 1:
    raise GenerationError(f"the prompts' images must share one shape [Y, X, C], got {shapes}")
  out = np.zeros((len(images), max(map(len, images)), *shapes.pop()), np.float32)
  for b, x in enumerate(images):
    out[b, : len(x)] = x
  return out


def _completion(tokens: np.ndarray, stop_ids: Sequence[int]) -> Completion:
  ids = tokens.tolist()
  for k, token in enumerate(ids):
    if token in stop_ids:
      return Completion(ids[:k], "stop")
  return Completion(ids, "length")


def generate(
  model: transformer.Transformer,
  params: Any,
  prompts: Sequence[Sequence[int]],
  sampling: Sampling = _DEFAULT,
  *,
  stop_ids: Sequence[int] = (),
  seed: int = 0,
  batch_size: int = 8,
  mesh: jax.sharding.Mesh | None = None,
  rules: sharding.Rules = (),
  progress: bool = False,
  images: Sequence[np.ndarray] | None = None,
  vocab_size: int = 0,
) -> list[Completion]:
  """Completions of `prompts` (token ids), in their order, `batch_size` prompts at a time
  (longest first, so that a batch's prompts are of similar lengths).

  With a `mesh`, `params` are sharded on it under `rules` and so is each batch. `images` (a model
  that reads them, `model/llava.py`): each prompt's images [M, Y, X, C], whose features the
  prefill puts in the KV cache in place of the prompt's image tokens. `vocab_size`: the
  tokenizer's; ids at or past it, which it cannot decode, are never chosen (0: any id).
  """
  sampling = _known(sampling, vocab_size)
  return _generate(
    model, params, prompts, sampling, stop_ids, seed, batch_size, mesh, rules, progress, images, 1
  )


def _known(sampling: Sampling, vocab_size: int) -> Sampling:
  return dataclasses.replace(sampling, vocab_size=vocab_size) if vocab_size else sampling


def generate_samples(
  model: transformer.Transformer,
  params: Any,
  prompts: Sequence[Sequence[int]],
  sampling: Sampling = _DEFAULT,
  *,
  num_samples: int,
  stop_ids: Sequence[int] = (),
  seed: int = 0,
  batch_size: int = 8,
  mesh: jax.sharding.Mesh | None = None,
  rules: sharding.Rules = (),
  progress: bool = False,
  vocab_size: int = 0,
) -> list[list[Completion]]:
  """`num_samples` completions of each prompt (RLHF rollouts, best-of-K): each prompt is
  prefilled once and its KV cache repeated for its samples, which then decode together.

  Sample j of prompt i is the completion `generate` gives (same seed) for prompt i * K + j of
  the prompts each repeated K times: the same RNG keys, so the same tokens. `batch_size`:
  sequences decoded together (prompts x samples; at least one prompt a batch). What is saved is
  the prefill (K times fewer prompt tokens computed); each sample's rows of the cache are still
  its own, so a decoding step reads the prompt K times. `vocab_size`: as in `generate`.
  """
  if num_samples < 1:
    raise ConfigError(f"num_samples={num_samples} must be positive")
  flat = _generate(
    model,
    params,
    prompts,
    _known(sampling, vocab_size),
    stop_ids,
    seed,
    max(1, batch_size // num_samples),
    mesh,
    rules,
    progress,
    None,
    num_samples,
  )
  return [flat[i : i + num_samples] for i in range(0, len(flat), num_samples)]


def _generate(
  model,
  params,
  prompts,
  sampling,
  stop_ids,
  seed,
  batch_size,
  mesh,
  rules,
  progress,
  images,
  samples,
) -> list[Completion]:
  """`generate` with `samples` completions of each prompt: prompt i's sample j at i * K + j."""
  sampling.validate()
  if batch_size < 1:
    raise ConfigError(f"batch_size={batch_size} must be positive")
  stop_ids = tuple(int(i) for i in stop_ids)
  order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
  out: list[Completion | None] = [None] * (len(prompts) * samples)
  chief = jax.process_index() == 0
  with tqdm(total=len(prompts), unit="prompt", disable=not (progress and chief)) as bar:
    for start in range(0, len(order), batch_size):
      rows = order[start : start + batch_size]
      batch_images = None if images is None else [np.asarray(images[i]) for i in rows]
      run = _Run(
        model,
        params,
        [prompts[i] for i in rows],
        rows,
        sampling,
        stop_ids,
        seed,
        mesh,
        rules,
        images=batch_images,
        samples=samples,
      )
      tokens_bo = run.advance(run.plan.steps)
      slots = [i * samples + j for i in rows for j in range(samples)]
      for slot, tokens in zip(slots, tokens_bo, strict=True):
        out[slot] = _completion(tokens, stop_ids)
      bar.update(len(rows))
  return out  # type: ignore[return-value]


def stream(
  model: transformer.Transformer,
  params: Any,
  prompt: Sequence[int],
  sampling: Sampling = _DEFAULT,
  *,
  stop_ids: Sequence[int] = (),
  seed: int = 0,
  mesh: jax.sharding.Mesh | None = None,
  rules: sharding.Rules = (),
  images: np.ndarray | None = None,
  vocab_size: int = 0,
) -> Iterator[int]:
  """The tokens of one completion as they come (the stop id is not yielded): `generate`'s
  compiled loop, run one token at a time. The same seed gives the same tokens as `generate`.
  `images`: the prompt's images [M, Y, X, C], and `vocab_size`, as in `generate`."""
  sampling = _known(sampling, vocab_size)
  sampling.validate()
  stop_ids = tuple(int(i) for i in stop_ids)
  batch_images = None if images is None else [np.asarray(images)]
  run = _Run(
    model, params, [prompt], [0], sampling, stop_ids, seed, mesh, rules, images=batch_images
  )
  for produced in range(1, run.plan.steps + 1):
    token = int(run.advance(produced)[0, -1])
    if token in stop_ids:
      return
    yield token


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
  """`text` up to the earliest of `stop_strings`, and whether one was there."""
  cut = min((i for i in (text.find(s) for s in stop_strings if s) if i >= 0), default=-1)
  return (text[:cut], True) if cut >= 0 else (text, False)


def template_stop_ids(tokenizer: Any, template: str) -> tuple[int, ...]:
  """Ids that end an assistant turn: EOS and the template's special tokens (LIMA's EOT,
  ChatML's end of message) that the tokenizer has."""
  specials = (tokenizer.special_id(t) for t in templates.TEMPLATES[template].special_tokens)
  return tuple(dict.fromkeys([tokenizer.eos_id, *(i for i in specials if i is not None)]))
