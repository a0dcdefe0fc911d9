"""Sampling with the KV cache, against full recomputation, Hugging Face's logits processors and
the real stories260K model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from test_llama2c import FIRST_IDS, PUBLISHED

from jaxtune import generate, sharding
from jaxtune import sampling as sampling_lib
from jaxtune.config import MeshConfig
from jaxtune.config_model import ModelConfig
from jaxtune.convert import llama2c
from jaxtune.data import llama2c_tokenizer
from jaxtune.errors import ConfigError
from jaxtune.model import attention, transformer

GREEDY = generate.Sampling(max_new_tokens=24)
SAMPLED = generate.Sampling(
  max_new_tokens=24, temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.2
)


@pytest.fixture(scope="module")
def stories(data_dir):
  folder = data_dir / "models" / "stories260K"
  cfg, variables = llama2c.load_model(str(folder / "stories260K.bin"))
  tok = llama2c_tokenizer.Tokenizer.load(str(folder / "tok512.bin"))
  prompts = [[1]] + [
    [1, *tok.encode(text, first=True)]
    for text in ("Once upon a time, Tom", "The cat sat", "Lily and her mom went to the big park")
  ]
  return transformer.Transformer(cfg), variables["params"], tok, prompts


def _tiny(**overrides) -> tuple[transformer.Transformer, dict]:
  cfg = ModelConfig(
    vocab_size=64, dim=32, num_layers=2, num_heads=4, mlp_dim=64, max_seq_len=48, **overrides
  )
  model = transformer.Transformer(cfg)
  abstract = jax.eval_shape(transformer.init_fn(model), jax.random.key(0))["params"]
  rng = np.random.default_rng(1)  # Random weights without compiling the initializer.
  return model, jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.5, x.shape), x.dtype), abstract)


def _recomputed_greedy(model, params, prompts, steps, penalty=1.0):
  """Argmax decoding without a cache: every sequence through the model again for every token
  (right-padded rows of one length, padding marked by segment id 0: one compilation), with
  Hugging Face's repetition penalty over each sequence so far."""
  length = max(map(len, prompts)) + steps
  forward = jax.jit(lambda t, s: model.apply({"params": params}, t, segment_ids_bt=s))
  penalize = transformers.RepetitionPenaltyLogitsProcessor(penalty)
  ids = [list(p) for p in prompts]
  for _ in range(steps):
    tokens, segments = np.zeros((2, len(ids), length), np.int32)
    for row, seq in enumerate(ids):
      tokens[row, : len(seq)], segments[row, : len(seq)] = seq, 1
    logits_btv = np.array(forward(tokens, segments))  # Writable, for torch.
    for row, seq in enumerate(ids):
      logits_1v = torch.as_tensor(logits_btv[row, len(seq) - 1])[None]
      seq.append(int(penalize(torch.as_tensor([seq]), logits_1v).argmax()))
  return [seq[len(p) :] for seq, p in zip(ids, prompts, strict=True)]


def test_published_text(stories):
  model, params, tok, _ = stories
  steps = len(tok.encode(PUBLISHED, first=True))
  (out,) = generate.generate(
    model, params, [[tok.bos_id]], dataclasses.replace(GREEDY, max_new_tokens=steps)
  )
  assert out.ids[:10] == FIRST_IDS
  assert tok.decode(out.ids) == PUBLISHED
  assert out.finish == "length"


def test_greedy_with_cache_equals_full_recomputation(stories):
  model, params, _, prompts = stories
  outs = generate.generate(model, params, prompts, GREEDY)
  assert [o.ids for o in outs] == _recomputed_greedy(model, params, prompts, GREEDY.max_new_tokens)
  penalized = dataclasses.replace(GREEDY, repetition_penalty=1.3)  # Over prompt and output.
  outs = generate.generate(model, params, prompts, penalized)
  assert [o.ids for o in outs] == _recomputed_greedy(model, params, prompts, 24, penalty=1.3)


@pytest.mark.parametrize(
  "overrides",
  [dict(num_kv_heads=1), dict(num_kv_heads=2, position="learned", norm="layernorm", use_bias=True)],
  ids=["mqa", "gqa-gpt2-like"],
)
def test_greedy_with_cache_equals_full_recomputation_tiny(overrides):
  model, params = _tiny(**overrides)
  prompts = [[3, 9, 27], [5], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
  outs = generate.generate(model, params, prompts, dataclasses.replace(GREEDY, max_new_tokens=12))
  assert [o.ids for o in outs] == _recomputed_greedy(model, params, prompts, 12)


def test_ids_past_the_tokenizers_vocabulary_are_never_chosen():
  """A model whose embedding is padded past its tokenizer's 48 ids: with `vocab_size` they are
  never chosen, greedy or sampled, even where they hold the largest logits (`pick`), and a tiny
  model whose padded rows are made large (so that they win often) never emits them."""
  logits_bv = np.random.default_rng(2).normal(0, 1, (256, 64)).astype(np.float32)
  logits_bv[:, 48:] += 3.0  # The padded ids win most draws.
  keys = jax.random.split(jax.random.key(0), 256)
  for sampling in (generate.Sampling(), generate.Sampling(temperature=1.0, top_p=0.95)):
    padded = sampling_lib.pick(jnp.asarray(logits_bv), None, sampling, keys)
    assert (np.asarray(padded) >= 48).mean() > 0.5
    known = dataclasses.replace(sampling, vocab_size=48)
    picked = np.asarray(sampling_lib.pick(jnp.asarray(logits_bv), None, known, keys))
    assert picked.max() < 48
    if sampling.temperature == 0:
      np.testing.assert_array_equal(picked, logits_bv[:, :48].argmax(-1))
  model, params = _tiny()
  table = params["embed"]["embedding"]  # Boxed with its logical axes.
  params = {**params, "embed": {"embedding": table.replace(value=table.value.at[48:].multiply(3))}}
  sampled = dataclasses.replace(GREEDY, max_new_tokens=12, temperature=1.0)
  outs = generate.generate(model, params, [[3, 9, 27], [5]], sampled, vocab_size=48)
  assert max(max(o.ids) for o in outs) < 48


def test_cache_is_sized_by_kv_heads():
  sizes = {}
  for kv in (4, 2, 1):
    model = transformer.Transformer(
      ModelConfig(dim=32, num_layers=2, num_heads=4, num_kv_heads=kv, max_seq_len=48)
    )
    cache = transformer.init_cache(model, batch=3, max_length=20)
    heads = (kv,) if kv > 1 else ()  # One KV head: no heads' axis.
    for name in ("key", "value"):  # One array per layer.
      assert [x.shape for x in cache[name]] == [(3, *heads, 20, 8)] * 2
    sizes[kv] = sum(x.size for x in jax.tree.leaves(cache))
  positions = 3 * 20 + 1  # segment ids and the index
  assert (sizes[2] - positions) * 2 == sizes[4] - positions
  assert (sizes[1] - positions) * 4 == sizes[4] - positions


def test_batched_prompts_equal_each_alone(stories):
  """Sampled with every transform on (greedy batches are compared with each prompt's own
  recomputation above): each prompt draws the same tokens in a batch as alone."""
  model, params, _, prompts = stories
  together = generate.generate(model, params, prompts, SAMPLED, seed=7)
  assert together == generate.generate(model, params, prompts, SAMPLED, seed=7, batch_size=1)
  assert len({tuple(c.ids) for c in together}) == len(prompts)


def test_shared_prefill_samples_equal_independent_samples(stories):
  """K samples of a prompt from one prefill draw what K copies of the prompt draw (sample j of
  prompt i: row i * K + j), with every transform on."""
  model, params, _, prompts = stories
  k, two = 3, prompts[1:3]
  shared = generate.generate_samples(model, params, two, SAMPLED, num_samples=k, seed=7)
  copies = [p for p in two for _ in range(k)]
  alone = generate.generate(model, params, copies, SAMPLED, seed=7, batch_size=len(copies))
  assert shared == [alone[:k], alone[k:]]
  assert len({tuple(c.ids) for c in shared[0]}) == k  # The samples differ.


def test_sampling_is_reproducible_and_top_k_1_is_greedy(stories):
  model, params, _, prompts = stories
  first = generate.generate(model, params, prompts, SAMPLED, seed=3)
  assert generate.generate(model, params, prompts, SAMPLED, seed=3) == first
  assert generate.generate(model, params, prompts, SAMPLED, seed=4) != first
  top1 = dataclasses.replace(SAMPLED, temperature=1.0, top_k=1, top_p=1.0)
  greedy = dataclasses.replace(GREEDY, repetition_penalty=SAMPLED.repetition_penalty)
  assert generate.generate(model, params, prompts, top1, seed=3) == generate.generate(
    model, params, prompts, greedy
  )


def test_stream_yields_what_generate_returns(stories):
  model, params, _, prompts = stories
  for sampling in (GREEDY, SAMPLED):
    (out,) = generate.generate(model, params, prompts[1:2], sampling, seed=5)
    assert list(generate.stream(model, params, prompts[1], sampling, seed=5)) == out.ids


def test_stop_ids_end_each_row_on_its_own(stories):
  model, params, tok, prompts = stories
  free = generate.generate(model, params, prompts, GREEDY)
  stop = free[0].ids[5]  # Row 0 stops at its 6th token; the others where they meet it, if ever.
  stopped = generate.generate(model, params, prompts, GREEDY, stop_ids=[stop])
  for out, full in zip(stopped, free, strict=True):
    if stop in full.ids:
      assert (out.ids, out.finish) == (full.ids[: full.ids.index(stop)], "stop")
    else:
      assert out == full
  assert stopped[0].ids == free[0].ids[:5]
  assert (
    list(generate.stream(model, params, prompts[0], GREEDY, stop_ids=[stop])) == free[0].ids[:5]
  )


def test_generation_stops_at_the_models_positions():
  model, params = _tiny()  # 48 positions.
  (out,) = generate.generate(model, params, [list(range(1, 41))], GREEDY)
  assert (len(out.ids), out.finish) == (9, "length")  # Predicted at positions 39..47.
  assert [out.ids] == _recomputed_greedy(model, params, [list(range(1, 41))], 9)
  with pytest.raises(ValueError, match="a prompt of 48 tokens leaves no room"):
    generate.generate(model, params, [[1] * 48], GREEDY)
  with pytest.raises(ValueError, match="empty prompt"):
    generate.generate(model, params, [[]], GREEDY)
  with pytest.raises(ConfigError, match="top_p must be in"):
    generate.generate(model, params, [[1]], dataclasses.replace(SAMPLED, top_p=0.0))


def test_sharded_generation_equals_single_device(stories, monkeypatch):
  model, params, _, prompts = stories
  mesh = sharding.make_mesh(MeshConfig(data=2, model=4))
  abstract = jax.eval_shape(transformer.init_fn(model), jax.random.key(0))
  rules = sharding.resolve_rules("fsdp", mesh, abstract)
  shardings = sharding.variable_shardings(abstract, mesh, rules, "fsdp")["params"]
  sharded = jax.tree.map(jax.device_put, params, shardings)
  on_mesh = generate.generate(model, sharded, prompts, SAMPLED, mesh=mesh, rules=rules)
  assert on_mesh == generate.generate(model, params, prompts, SAMPLED)
  # A prefill longer than a block of queries (here 4: the longest prompt makes 3 blocks, the
  # last one padded) attends block by block, on the mesh and off it, to the same tokens.
  monkeypatch.setattr(attention, "PREFILL_BLOCK", 4)
  generate._compiled.cache_clear()  # Compiled with blocks of 4 from here on ...
  try:
    assert max(map(len, prompts)) > 2 * attention.PREFILL_BLOCK
    blocked = generate.generate(model, sharded, prompts, SAMPLED, mesh=mesh, rules=rules)
    assert blocked == on_mesh
    assert generate.generate(model, params, prompts, SAMPLED) == on_mesh
  finally:
    generate._compiled.cache_clear()  # ... and no further.


# The sampling transforms against Hugging Face's logits processors.

LOGITS_BV = np.random.default_rng(0).normal(0, 2, (4, 50)).astype(np.float32)
SEEN_BT = np.random.default_rng(1).integers(0, 50, (4, 7))


def _hf(processor, logits_bv=LOGITS_BV):
  return processor(torch.as_tensor(SEEN_BT), torch.as_tensor(logits_bv)).numpy()


def test_repetition_penalty_equals_hugging_face():
  seen_bv = np.zeros_like(LOGITS_BV, bool)
  np.put_along_axis(seen_bv, SEEN_BT, True, axis=1)
  got = sampling_lib.penalize_repetition(jnp.asarray(LOGITS_BV), jnp.asarray(seen_bv), 1.3)
  want = _hf(transformers.RepetitionPenaltyLogitsProcessor(1.3))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert not np.allclose(got, LOGITS_BV)


@pytest.mark.parametrize("k", [1, 5, 49])
def test_top_k_equals_hugging_face(k):
  got = sampling_lib.top_k_filter(jnp.asarray(LOGITS_BV), k)
  np.testing.assert_array_equal(got, _hf(transformers.TopKLogitsWarper(k)))
  assert (np.isfinite(got).sum(-1) == k).all()


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_equals_hugging_face(p):
  got = sampling_lib.top_p_filter(jnp.asarray(LOGITS_BV), p)
  np.testing.assert_array_equal(got, _hf(transformers.TopPLogitsWarper(p)))


def test_pick_draws_from_the_filtered_distribution():
  """Frequencies of 20,000 draws from one row match softmax(logits / T) restricted to the top k."""
  logits_v = jnp.asarray(LOGITS_BV[0])
  sampling = generate.Sampling(temperature=1.5, top_k=6)
  n = 20_000
  keys = jax.random.split(jax.random.key(0), n)
  draws = sampling_lib.pick(jnp.broadcast_to(logits_v, (n, 50)), None, sampling, keys)
  hf = _hf(transformers.TopKLogitsWarper(6), LOGITS_BV / 1.5)[0]
  want = np.exp(hf - hf.max()) / np.exp(hf - hf.max()).sum()
  got = np.bincount(np.asarray(draws), minlength=50) / n
  np.testing.assert_allclose(got, want, atol=0.012)
  assert set(np.flatnonzero(got)) == set(np.flatnonzero(want))
  greedy = sampling_lib.pick(jnp.asarray(LOGITS_BV), None, generate.Sampling(), keys[:4])
  np.testing.assert_array_equal(greedy, LOGITS_BV.argmax(-1))


def test_cut_at_stop():
  assert generate.cut_at_stop("a\n\nQ: b Q:", ["Q:", "\n\n"]) == ("a", True)
  assert generate.cut_at_stop("no stop here", ["Q:", ""]) == ("no stop here", False)


def test_a_cache_too_large_for_memory_is_refused_before_it_is_allocated(monkeypatch):
  cfg = ModelConfig(vocab_size=64, dim=32, num_layers=2, num_heads=4, mlp_dim=64, max_seq_len=2**30)
  model = transformer.Transformer(cfg)
  abstract = jax.eval_shape(transformer.init_fn(model), jax.random.key(0))["params"]
  params = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), abstract)
  monkeypatch.setattr(generate, "free_memory", lambda devices: (2**20, "the host"))
  sampling = generate.Sampling(max_new_tokens=100_000_000)
  with pytest.raises(
    generate.GenerationError, match="is free on the host: about max_new_tokens="
  ) as e:
    generate.generate(model, params, [[1, 2, 3]], sampling)
  fit = int(str(e.value).rpartition("max_new_tokens=")[2].split()[0])
  plan = generate._plan([3], fit, cfg.max_seq_len)
  generate._check_cache_fits(model, plan, 1, None)  # What it says fits does.
  with pytest.raises(generate.GenerationError):
    generate._check_cache_fits(model, generate._plan([3], fit * 2, cfg.max_seq_len), 1, None)


@pytest.mark.parametrize("name, value", [("temperature", float("inf")), ("top_p", float("nan"))])
def test_sampling_values_must_be_finite(name, value):
  with pytest.raises(ConfigError, match="must be finite"):
    generate.Sampling(**{name: value}).validate()


def test_batch_size_must_be_positive():
  model, params = _tiny()
  with pytest.raises(ConfigError, match="batch_size=0 must be positive"):
    generate.generate(model, params, [[1, 2]], batch_size=0)
