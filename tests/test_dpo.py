"""DPO, IPO, conservative DPO and SimPO on packed preference batches.

The reference is a direct PyTorch transcription of the papers' formulas (as TRL writes them), fed
with each response's log-probability from its own forward pass, alone in a row: so the packed
step's segment sums, pairs and K-wise averaging are checked too.
"""

import dataclasses
import math

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import logsumexp

from jaxtune import config, sharding
from jaxtune.config_model import ModelConfig
from jaxtune.data import packing
from jaxtune.errors import ConfigError
from jaxtune.model import transformer
from jaxtune.model.adapters import Adapters
from jaxtune.peft import partition
from jaxtune.train import dpo, loop, precomputed, preference, reference

VOCAB = 64
MODEL = ModelConfig(
  vocab_size=VOCAB, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64, max_seq_len=64
)
LENGTH = 48
BETA, SMOOTHING, GAMMA = 0.3, 0.2, 0.7


def _groups(seed: int, sizes=(2, 2, 3, 2, 2, 3)) -> list[packing.Group]:
  """Random groups: one prompt, K responses of their own lengths, a random strict ranking."""
  rng = np.random.default_rng(seed)
  out = []
  for k in sizes:
    prompt = rng.integers(1, VOCAB, int(rng.integers(2, 6)))
    responses = []
    for _ in range(k):
      response = rng.integers(1, VOCAB, int(rng.integers(2, 6)))
      ids = np.concatenate([prompt, response]).astype(np.int32)
      responses.append(packing.Example(ids, np.arange(len(ids)) >= len(prompt)))
    out.append(packing.Group(tuple(responses), tuple(int(r) for r in rng.permutation(k))))
  return out


def _batch(groups, rows: int, pack: bool) -> dict[str, np.ndarray]:
  placed = packing.assign_rows([g.pairs for g in groups], rows, LENGTH, pack)
  assert sum(map(len, placed)) == len(groups)
  return dict(vars(packing.make_batch(groups, placed, LENGTH)))


def _init(model, seed):
  return nn.meta.unbox(jax.jit(transformer.init_fn(model))(jax.random.key(seed)))["params"]


@pytest.fixture(scope="module")
def policy_and_reference():
  model = transformer.Transformer(MODEL)
  return model, _init(model, 0), _init(model, 1)


def _log_probs(model, params, examples) -> list[float]:
  """log pi(response | prompt) of each example alone in a row, in float64 NumPy after the
  model's logits."""
  ids = np.zeros((len(examples), LENGTH + 1), np.int32)
  for i, ex in enumerate(examples):
    ids[i, : len(ex)] = ex.ids
  logits = np.asarray(jax.jit(model.apply)({"params": params}, ids[:, :-1]), np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  out = []
  for i, ex in enumerate(examples):
    token = log_p[i, np.arange(len(ex) - 1), ex.ids[1:]]
    out.append(float((token * ex.supervised[1:]).sum()))
  return out


def _torch_losses(kind: str, pol, ref, lengths) -> torch.Tensor:
  """The papers' per-pair losses, TRL's way; pol/ref/lengths: [pairs, 2] (better, worse)."""
  pol, ref, lengths = (torch.tensor(x, dtype=torch.float64) for x in (pol, ref, lengths))
  logits = (pol[:, 0] - pol[:, 1]) - (ref[:, 0] - ref[:, 1])
  if kind == "dpo":
    return -F.logsigmoid(BETA * logits)
  if kind == "cdpo":
    return -F.logsigmoid(BETA * logits) * (1 - SMOOTHING) - F.logsigmoid(-BETA * logits) * SMOOTHING
  if kind == "ipo":
    return (logits - 1 / (2 * BETA)) ** 2
  avg = pol / lengths
  return -F.logsigmoid(BETA * (avg[:, 0] - avg[:, 1]) - GAMMA)  # simpo


def _expected(kind, groups, pol_all, ref_all) -> float:
  """Mean over groups of the mean over each group's C(K, 2) pairs, one pair at a time."""
  per_group, start = [], 0
  for g in groups:
    k = len(g.responses)
    pol, ref = pol_all[start : start + k], ref_all[start : start + k]
    start += k
    n = [float(r.supervised[1:].sum()) for r in g.responses]
    pairs = [(i, j) for i in range(k) for j in range(k) if g.ranks[i] < g.ranks[j]]
    assert len(pairs) == math.comb(k, 2)
    pol, ref, n = ([[x[i], x[j]] for i, j in pairs] for x in (pol, ref, n))
    per_group.append(float(_torch_losses(kind, pol, ref, n).mean()))
  return float(np.mean(per_group))


def _objective(kind, model):
  name = "dpo" if kind == "cdpo" else kind
  return dpo.DPO(model, name, BETA, SMOOTHING if kind == "cdpo" else 0.0, GAMMA)


KINDS = ("dpo", "cdpo", "ipo", "simpo")


def test_losses_equal_the_papers_formulas(policy_and_reference):
  model, params, ref_params = policy_and_reference
  groups = _groups(0)
  batch = _batch(groups, rows=3, pack=True)
  goals = [_objective(kind, model) for kind in KINDS]
  both = {**params, reference.REFERENCE: ref_params}
  sums = jax.jit(lambda b: [g.loss(both, b, None)[0] for g in goals])(batch)
  assert float(goals[0].normalizer(batch)) == len(groups)
  examples = [r for g in groups for r in g.responses]
  pol, ref = _log_probs(model, params, examples), _log_probs(model, ref_params, examples)
  for kind, loss_sum in zip(KINDS, sums, strict=True):
    expected = _expected(kind, groups, pol, ref)
    np.testing.assert_allclose(
      float(loss_sum) / len(groups), expected, rtol=1e-5, atol=1e-6, err_msg=kind
    )


def test_packed_equals_unpacked_loss_and_gradients(policy_and_reference):
  """Also with the pair matrices bounded to the packed rows' most segments (`segments`), as the
  loop bounds them (`pipeline.max_segments`): [B, 10, 10] rather than [B, T + 1, T + 1]."""
  model, params, ref_params = policy_and_reference
  groups = _groups(1)
  packed_batch = _batch(groups, rows=len(groups), pack=True)  # First fit: the last rows empty.
  assert (packed_batch["groups"].max(axis=1) > 1).any() and not packed_batch["groups"][-1].any()
  most = int(packed_batch["segment_ids"].max())
  assert most == 9

  def grad(goal):
    def mean_loss(trainable, batch):
      loss, metrics = goal.loss({**trainable, reference.REFERENCE: ref_params}, batch, None)
      n = goal.normalizer(batch)
      return loss / n, jax.tree.map(lambda m: m / n, metrics)

    return jax.jit(jax.value_and_grad(mean_loss, has_aux=True)), mean_loss

  full, _ = grad(_objective("dpo", model))
  bounded, bounded_loss = grad(dataclasses.replace(_objective("dpo", model), segments=most))
  (unpacked, um), ug = full(params, _batch(groups, rows=len(groups), pack=False))
  for step in (full, bounded):
    (packed, pm), pg = step(params, packed_batch)
    np.testing.assert_allclose(packed, unpacked, rtol=1e-5)
    for k in pm:
      np.testing.assert_allclose(pm[k], um[k], rtol=1e-5, atol=1e-6, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), pg, ug)
    assert 0 < float(pm["kl"])
  jaxpr = jax.make_jaxpr(bounded_loss)(params, packed_batch)
  shapes = {tuple(v.aval.shape) for e in jaxpr.jaxpr.eqns for v in e.outvars}
  assert (len(groups), most + 1, most + 1) in shapes
  assert not any(len(s) == 3 and s[1:] == (LENGTH + 1, LENGTH + 1) for s in shapes)


def test_lora_at_init_is_its_reference():
  """LoRA's B starts at 0: the policy is the frozen base, so the loss is log 2, rewards 0."""
  adapters = Adapters(lora_rank=4, lora_targets=("q", "v", "down"))
  model = transformer.Transformer(MODEL, adapters)
  params = _init(model, 2)
  goal = _objective("dpo", model)
  batch = _batch(_groups(2, sizes=(2,) * 6), rows=3, pack=True)
  loss, metrics = jax.jit(goal.loss, static_argnums=2)(params, batch, None)
  n = float(goal.normalizer(batch))
  assert float(loss) / n == pytest.approx(math.log(2), abs=1e-7)
  for key in ("rewards_chosen", "rewards_rejected", "margin", "kl", "accuracy"):
    assert float(metrics[key]) == 0.0, key


def test_full_fine_tuning_without_a_reference_copy_is_an_error(policy_and_reference):
  model, params, _ = policy_and_reference
  with pytest.raises(ConfigError, match="never its own reference"):
    _objective("dpo", model).loss(params, _batch(_groups(3), 3, True), None)


def _run(mesh_shape, peft, batch, goal="dpo", micro_batches=1, ref="auto", top_k=VOCAB):
  cfg = config.load(
    None,
    [
      f"model.{k}={v}"
      for k, v in dict(vocab_size=VOCAB, dim=32, num_layers=2, num_heads=4, mlp_dim=64).items()
    ]
    + [
      f"train.objective={goal}",
      f"train.reference={ref}",
      f"train.reference_top_k={top_k}",
      "train.batch_size=8",
      f"train.micro_batches={micro_batches}",
      "train.learning_rate=1e-2",
      "train.warmup_steps=0",
      "train.schedule=constant",
      f"peft.method={peft}",
      f"mesh.data={mesh_shape[0]}",
      f"mesh.model={mesh_shape[1]}",
    ],
  )
  devices = jax.devices()[: mesh_shape[0] * mesh_shape[1]]
  mesh = sharding.make_mesh(cfg.mesh, devices)
  t = loop.build(cfg, mesh, steps=2)
  state, out = t.state, []
  with sharding.use(mesh, t.rules):
    put = {
      k: jax.device_put(v, t.batch_sharding)
      for k, v in batch.items()
      if k in t.objective.batch_keys
    }
    if ref == "precomputed":  # The initial policy's, as the loop computes them.
      initial = partition.combine(t.state.params, t.frozen)
      put.update(precomputed.log_probs_step(*reference.initial(t.model, initial), top_k)(put))
    for _ in range(2):
      state, metrics = t.train_step(state, t.frozen, put)
      out.append(jax.device_get(metrics))
  assert t.train_step.jitted._cache_size() == 1  # Compiled once.
  return out


SHARDED_BATCH = _batch(_groups(4, sizes=(2, 3) * 6), rows=8, pack=True)


@pytest.fixture(scope="module")
def one_device():
  return _run((1, 1), "none", SHARDED_BATCH)


@pytest.mark.parametrize("shape, micro_batches", [((2, 4), 2), ((8, 1), 1)])
def test_sharded_steps_equal_one_device(shape, micro_batches, one_device):
  """Full fine-tuning, its reference a frozen copy sharded like the policy: two steps on 2x4 (in
  2 micro-batches) and 8x1 give one device's losses and metrics. The first step's loss is log 2:
  the copy is the initial policy."""
  assert one_device[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
  for a, b in zip(
    one_device, _run(shape, "none", SHARDED_BATCH, "dpo", micro_batches), strict=True
  ):
    for key in ("loss", "grad_norm", "rewards_chosen", "accuracy", "kl", "margin"):
      np.testing.assert_allclose(a[key], b[key], rtol=2e-5, atol=1e-6, err_msg=f"{shape} {key}")
  assert one_device[-1]["loss"] < one_device[0]["loss"]


PRECOMPUTED_KEYS = ("loss", "grad_norm", "rewards_chosen", "rewards_rejected", "accuracy", "margin")


def test_precomputed_reference_steps_equal_the_live_copy(one_device):
  """train.reference=precomputed: two steps with each token's reference log-probability and its
  top-k next tokens in the batch give the frozen copy's losses, gradients and metrics, with no
  reference model in the step; with k = the vocabulary the top-k KL is the copy's token KL."""
  out = _run((1, 1), "none", SHARDED_BATCH, ref="precomputed", top_k=VOCAB)
  for a, b in zip(one_device, out, strict=True):
    for key in (*PRECOMPUTED_KEYS, "kl"):
      np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)
  assert one_device[1]["kl"] > 1e-3  # The second step's policy has moved.


@pytest.mark.parametrize("k", [4, VOCAB])
def test_top_k_kl_is_numpys_coarsened_kl_and_a_lower_bound(k):
  """`token_kl_top_k` against NumPy's KL of the two distributions coarsened to the reference's
  top k ids and the rest: below the token KL for k = 4 of 64, equal to it for k = 64."""
  rng = np.random.default_rng(0)
  logits_btv, ref_btv = (rng.normal(0, 2, (2, 5, VOCAB)).astype(np.float32) for _ in "pq")
  top_k_kl = jax.jit(lambda p, q: preference.token_kl_top_k(p, *preference.top_k(q, k)))
  kl_bt = np.asarray(top_k_kl(logits_btv, ref_btv))
  p_btv, q_btv = (np.exp(x - logsumexp(x, -1, keepdims=True)) for x in (logits_btv, ref_btv))
  top_btk = np.argsort(-q_btv, axis=-1)[..., :k]
  p_btk, q_btk = (np.take_along_axis(x, top_btk, -1) for x in (p_btv, q_btv))
  p_rest, q_rest = 1 - p_btk.sum(-1), 1 - q_btk.sum(-1)
  want_bt = np.sum(p_btk * np.log(p_btk / q_btk), -1)
  if k < VOCAB:
    want_bt += p_rest * np.log(p_rest / q_rest)
  np.testing.assert_allclose(kl_bt, want_bt, rtol=1e-5, atol=1e-6)
  full_bt = np.asarray(preference.token_kl(logits_btv, ref_btv))
  assert np.all(kl_bt <= full_bt + 1e-6) and (k < VOCAB or np.allclose(kl_bt, full_bt, rtol=1e-5))
  assert k == VOCAB or np.all(kl_bt < full_bt - 1e-4)


def test_reference_choices(policy_and_reference):
  """train.reference: auto is the base under an adapter method and a copy under full fine-tuning;
  base under full fine-tuning is refused; a copy under LoRA is the base with the copied LoRA."""
  full = policy_and_reference[0]
  lora = transformer.Transformer(MODEL, Adapters(lora_rank=4, lora_targets=("q",)))
  assert reference.copies("auto", full) and not reference.copies("auto", lora)
  assert reference.copies("copy", lora) and not reference.copies("base", lora)
  assert not reference.copies("precomputed", full)
  with pytest.raises(ConfigError, match="train.reference=base needs an adapter method"):
    reference.copies("base", full)
  params = jax.eval_shape(transformer.init_fn(lora), jax.random.key(0))["params"]
  trainable, frozen = partition.split(params, partition.is_adapter)
  copy = jax.tree.map(lambda x: "copied", trainable)
  policy, ref_model, ref_params = reference.split(lora, {**params, reference.REFERENCE: copy})
  assert policy == params and ref_model is lora
  assert partition.split(ref_params, partition.is_adapter) == (copy, frozen)
