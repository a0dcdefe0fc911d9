"""A precomputed reference (`train.reference=precomputed`): each supervised token's reference
log-probability, and the reference's k most likely next tokens there (`train.reference_top_k`:
their ids, log-probabilities and the log of the rest of the mass, for DPO's `kl` metric),
computed once on the mesh before the first step, stored in the run folder
(`runs.REFERENCE_LOG_PROBS`) and read from the batches (`Example.reference`, `.reference_top` ->
the batch's `preference.PRECOMPUTED` keys) for every epoch and on resume. The step then runs no
reference model. The file takes 4 bytes per next-token pair and k * (4 + 4) + 4 per supervised
one (k = 16: 132 bytes), and so do the examples in memory.

The file is keyed by a fingerprint: the tokenized records (which the tokenizer, template and
length make), the tokenizer, the template, the length and truncation, the reference weights and k.
A fresh run computes the file where there is none; a resumed run needs it; a file whose
fingerprint differs is refused, naming what changed. Nothing is ever recomputed silently, and
the policy is never the reference.

A token's log-probability is the same packed with others or alone (segments never attend across),
so the batches of any epoch, packed in any order, read the values computed once.

Shape letters: B batch, T length, K the top k.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxtune import distributed, runs
from jaxtune.config import Config
from jaxtune.data import pipeline
from jaxtune.data.batches import Batches
from jaxtune.data.packing import Example, Group, TopK
from jaxtune.errors import ConfigError
from jaxtune.model import transformer
from jaxtune.sharding import BatchRows
from jaxtune.train import feed, preference, reference

log = logging.getLogger(__name__)

Item = Example | Group


def _responses(items: Sequence[Item]) -> list[Example]:
  return [r for item in items for r in item.responses]


@dataclasses.dataclass(frozen=True)
class Values:
  """A response's reference values: `Example.reference` and `Example.reference_top`."""

  log_probs: np.ndarray
  top: TopK


def _with(item: Item, values: Callable[[Example], Values]) -> Item:
  """`item` with each response's reference values set."""

  def one(r: Example) -> Example:
    v = values(r)
    return dataclasses.replace(r, reference=v.log_probs, reference_top=v.top)

  if isinstance(item, Group):
    return dataclasses.replace(item, responses=tuple(one(r) for r in item.responses))
  return one(item)


def log_probs_step(
  model: transformer.Transformer, params: Any, k: int
) -> Callable[[dict], dict[str, jax.Array]]:
  """Batch -> the `preference.PRECOMPUTED` arrays of `model` (jitted): its log-probability of
  each target times the target's weight [B, T], and its top `k` next tokens at every position
  (`preference.top_k`)."""

  @jax.jit
  def step(p, batch):
    logits_btv = model.apply(
      {"params": p}, batch["inputs"], batch["positions"], batch["segment_ids"]
    )
    log_p_bt = preference.token_log_probs(logits_btv, batch["targets"]) * batch["weights"]
    arrays = (log_p_bt, *preference.top_k(logits_btv, k))
    return dict(zip(preference.PRECOMPUTED, arrays, strict=True))

  return lambda batch: step(params, batch)


def compute(
  batches: Batches, count: int, put: Callable, step: Callable, rows: Sequence[int]
) -> dict[int, Values]:
  """id(response) -> its reference values (log-probabilities [pairs], the top k at its
  supervised pairs), over `count` batches of one pass (`rows`: this process's rows of the global
  batch)."""
  out: dict[int, Values] = {}
  for _ in range(count):
    batch, placed = batches.next_placed()
    arrays = multihost_utils.process_allgather(step(put(batch)), tiled=True)
    log_p_bt, ids_btk, top_btk, rest_bt = (np.asarray(arrays[k]) for k in preference.PRECOMPUTED)
    for row, items in zip(rows, placed, strict=True):
      start = 0
      for r in _responses(items):
        span = slice(start, start + r.pairs)
        at = start + np.flatnonzero(r.supervised[1:])
        top = TopK(ids_btk[row, at], top_btk[row, at], rest_bt[row, at].astype(np.float32))
        out[id(r)] = Values(log_p_bt[row, span].astype(np.float32), top)
        start += r.pairs
  return out


def weights_fingerprint(params: Any) -> str:
  """A digest of the reference weights, reduced on the devices (no parameter leaves them):
  each leaf's sum and its sum against a fixed pseudo-random pattern, to 5 significant digits
  (the same weights on another mesh reduce in another order)."""

  @jax.jit
  def sums(tree):
    def leaf(x):
      x = x.reshape(-1).astype(jnp.float32)
      pattern = jnp.sin(jnp.arange(x.size, dtype=jnp.float32) * 0.7548776662)
      return jnp.stack([jnp.sum(x), jnp.sum(x * pattern)])

    return jax.tree.map(leaf, tree)

  values = jax.device_get(sums(params))
  text = json.dumps(
    {
      jax.tree_util.keystr(k): [f"{v:.5e}" for v in leaf]
      for k, leaf in jax.tree_util.tree_flatten_with_path(values)[0]
    },
    sort_keys=True,
  )
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _tokenizer_fingerprint(tokenizer) -> str:
  digest = hashlib.sha256()
  with tempfile.TemporaryDirectory() as folder:
    tokenizer.save(folder)
    for root, _, files in sorted(os.walk(folder)):
      for name in sorted(files):
        with open(os.path.join(root, name), "rb") as f:
          digest.update(name.encode() + f.read())
  return digest.hexdigest()[:16]


def _records_fingerprint(train: Sequence[Item], held_out: Sequence[Item]) -> str:
  digest = hashlib.sha256()
  for part in (train, held_out):
    digest.update(b"|")
    for r in _responses(part):
      digest.update(r.ids.tobytes() + np.packbits(r.supervised).tobytes() + b",")
  return digest.hexdigest()[:16]


def fingerprint(cfg: Config, data: pipeline.Data, weights: str) -> dict[str, str]:
  """What the values depend on, part by part (so a mismatch names its part)."""
  return {
    "records": _records_fingerprint(data.train, data.eval),
    "tokenizer": _tokenizer_fingerprint(data.tokenizer),
    "template": cfg.data.template,
    "length": f"{cfg.data.max_length} ({cfg.data.truncation})",
    "reference weights": weights,
    "top k": str(cfg.train.reference_top_k),
  }


# File array suffix -> a response's values -> its array (concatenated over responses).
_ARRAYS: dict[str, Callable[[Values], np.ndarray]] = {
  "": lambda v: v.log_probs,
  "_top_ids": lambda v: v.top.ids,
  "_top_log_probs": lambda v: v.top.log_probs,
  "_top_rest": lambda v: v.top.rest,
}


def save(
  path: str, key: dict[str, str], values: dict[int, Values], data: pipeline.Data, k: int
) -> None:
  """The values of `data`'s responses, in order (training, then held-out), with their key."""
  arrays = {}
  for part, items in (("train", data.train), ("held_out", data.eval)):
    mine = [values[id(r)] for r in _responses(items)]
    none = TopK(np.zeros((0, k), np.int32), np.zeros((0, k), np.float32), np.zeros(0, np.float32))
    empty = Values(np.zeros(0, np.float32), none)
    for suffix, read in _ARRAYS.items():
      arrays[part + suffix] = np.concatenate([read(v) for v in mine] or [read(empty)])
  tmp = path + ".tmp.npz"
  np.savez(tmp, key=np.asarray(json.dumps(key, sort_keys=True)), **arrays)
  os.replace(tmp, path)


def load(path: str, key: dict[str, str], data: pipeline.Data) -> pipeline.Data:
  """`data` with the reference values of the file at `path`, whose key must be `key`: a
  ConfigError names the file and what changed otherwise."""
  with np.load(path) as f:
    saved = json.loads(str(f["key"]))
    arrays = {
      part + suffix: f[part + suffix]
      for part in ("train", "held_out")
      for suffix in _ARRAYS
      if part + suffix in f
    }
  changed = sorted(k for k in set(key) | set(saved) if key.get(k) != saved.get(k))
  if changed:
    detail = "; ".join(f"{k}: {saved.get(k)} then, {key.get(k)} now" for k in changed)
    raise ConfigError(
      f"{path}: the precomputed reference log-probabilities are stale ({detail}); delete the "
      "file to compute them again from a fresh run, or restore what changed"
    )
  parts = {}
  for part, items in (("train", data.train), ("held_out", data.eval)):
    responses = _responses(items)
    pairs = _offsets(path, arrays, part, [r.pairs for r in responses])
    tops = _offsets(path, arrays, part + "_top_rest", [r.supervised[1:].sum() for r in responses])
    top = [arrays[part + s] for s in ("_top_ids", "_top_log_probs", "_top_rest")]
    values = {
      id(r): Values(arrays[part][a:b], TopK(*(x[c:d] for x in top)))
      for r, (a, b), (c, d) in zip(responses, pairs, tops, strict=True)
    }
    parts[part] = [_with(item, lambda r, v=values: v[id(r)]) for item in items]
  return dataclasses.replace(data, train=parts["train"], eval=parts["held_out"])


def _offsets(path: str, arrays: dict, name: str, counts: Sequence[int]) -> list[tuple[int, int]]:
  """(start, end) of each response's values in the file's array `name`, which must hold them all."""
  ends = np.cumsum([0, *counts])
  if name not in arrays or len(arrays[name]) != ends[-1]:
    held = len(arrays[name]) if name in arrays else "no"
    raise ConfigError(f"{path}: {name} holds {held} values, the data {ends[-1]}")
  return list(zip(ends[:-1].tolist(), ends[1:].tolist(), strict=True))


def attach(
  cfg: Config,
  data: pipeline.Data,
  model: transformer.Transformer,
  params: Any,
  put: Callable,
  rows: BatchRows,
  resuming: bool,
) -> pipeline.Data:
  """`data` with its reference log-probabilities: from the run folder's file, or computed now
  (the reference of the policy's initial `params`) and saved there by a fresh run (`resuming`:
  the run has checkpoints, and the file must be there). One file per process of a
  multi-process run (each holds its own rows' data)."""
  k = cfg.train.reference_top_k
  if k > model.config.vocab_size:
    raise ConfigError(
      f"train.reference_top_k={k} is more than the model's {model.config.vocab_size} tokens"
    )
  ref_model, ref_params = reference.initial(model, params)
  name = runs.REFERENCE_LOG_PROBS
  if jax.process_count() > 1:
    name = name.replace(".npz", f".{jax.process_index()}-of-{jax.process_count()}.npz")
  path = os.path.join(cfg.train.output_dir, name)
  key = fingerprint(cfg, data, weights_fingerprint(ref_params))
  if os.path.exists(path):
    log.info("reference log-probabilities from %s", path)
    return load(path, key, data)
  if resuming:
    raise ConfigError(
      f"{path}: missing; train.reference=precomputed resumes with the reference "
      "log-probabilities its run computed at the start (or start a fresh train.output_dir)"
    )
  values = {}
  for items, positions in ((data.train, data.positions), (data.eval, data.eval_positions)):
    batches = feed.in_order(data, items, positions, cfg, rows)
    count = int(distributed.gather([batches.batches_per_epoch().batches]).max())
    step = log_probs_step(ref_model, ref_params, k)
    values.update(compute(batches, count, put, step, rows.mine))
  os.makedirs(cfg.train.output_dir, exist_ok=True)
  save(path, key, values, data, k)
  log.info("reference log-probabilities of %d responses computed, in %s", len(values), path)
  return load(path, key, data)
