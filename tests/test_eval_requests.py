"""The request types (`eval.requests`, `eval.scoring`) and multiple-choice metrics (`eval.choice`):
packed rows score as one request per row, on the real stories260K model on an 8-device mesh;
scores, is_greedy, acc, acc_norm and acc_mutual_info equal a hand computation (NumPy on one
sequence per forward pass) on a toy model; windows equal lm-evaluation-harness's."""

import csv

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxtune
from jaxtune import api, sharding
from jaxtune.config import MeshConfig
from jaxtune.config_model import ModelConfig
from jaxtune.data import packing
from jaxtune.eval import choice, requests, scoring
from jaxtune.model import transformer


@pytest.fixture(scope="module")
def stories_on_mesh(data_dir):
  mesh = sharding.make_mesh(MeshConfig(data=2, model=4))
  return jaxtune.load(data_dir / "models" / "stories260K" / "stories260K.bin", mesh=mesh)


def _mmlu_pairs(data_dir, n):
  with open(data_dir / "mmlu" / "data" / "dev" / "astronomy_dev.csv", newline="") as f:
    rows = list(csv.reader(f))[:n]
  return [(f"Question: {r[0]}\nAnswer:", f" {choice}") for r in rows for choice in r[1:5]] + [
    ("Once upon a time,", " there was a little girl named Lily."),
    ("", "Once upon a time"),
  ]


def test_packed_requests_score_as_one_per_row(stories_on_mesh, data_dir):
  """18 requests (MMLU questions and answers) packed several to a row of 512 give the scores
  (and is_greedy) they get one per row; a greedy continuation is found greedy."""
  pairs = _mmlu_pairs(data_dir, 4)
  ids = [requests.encode_pair(stories_on_mesh.tokenizer, c, x) for c, x in pairs]
  lengths = sorted((len(c) + len(x) - 1 for c, x in ids), reverse=True)
  assert max(map(len, packing.assign_rows(lengths, 2, 512, True))) >= 3  # Packed indeed.
  packed = scoring.score(stories_on_mesh, ids, batch_size=2, pack=True, row_length=512)
  alone = scoring.score(stories_on_mesh, ids, batch_size=8, pack=False)
  np.testing.assert_allclose(packed.logprob, alone.logprob, atol=1e-4, rtol=0)
  np.testing.assert_array_equal(packed.greedy, alone.greedy)
  assert packed.greedy[-2:].all()  # The model's own story opening.
  assert not packed.greedy[:-2].all()


def test_encode_pair_splits_the_whole_text(stories_on_mesh):
  """A continuation is the tail of the whole text's ids, BOS first; trailing context spaces move
  to the continuation; an empty context is BOS alone."""
  tok = stories_on_mesh.tokenizer
  context, continuation = requests.encode_pair(tok, "Once upon a ", "time")
  assert context + continuation == [tok.bos_id, *tok.encode("Once upon a time", first=True)]
  assert tok.decode(continuation) == "time" and context[0] == tok.bos_id
  assert requests.encode_pair(tok, "", "Once") == ([tok.bos_id], tok.encode("Once", first=True))


@pytest.mark.parametrize("length", [1, 5, 8, 9, 23])
def test_rolling_windows_equal_the_harness(length):
  from lm_eval import utils  # The test extra has the harness.

  ids = list(range(10, 10 + length))
  ours = requests.rolling_windows(ids, 1, max_seq_len=8)
  theirs = list(map(utils.make_disjoint_window, utils.get_rolling_token_windows(ids, 1, 8, 1)))
  assert ours == [tuple(map(list, w)) for w in theirs]
  assert [t for _, cont in ours for t in cont] == ids


@pytest.fixture(scope="module")
def toy(data_dir):
  """A random 2-layer model with stories260K's tokenizer, on one device."""
  stories = jaxtune.load(data_dir / "models" / "stories260K" / "stories260K.bin")
  cfg = ModelConfig(vocab_size=512, dim=32, num_layers=2, num_heads=4, mlp_dim=64, max_seq_len=64)
  abstract = jax.eval_shape(transformer.init_fn(transformer.Transformer(cfg)), jax.random.key(0))
  rng = np.random.default_rng(3)
  params = jax.tree.map(
    lambda x: jnp.asarray(rng.normal(0, 0.5, x.shape), x.dtype), abstract["params"]
  )
  return api.Model(cfg, params, stories.tokenizer)


def _by_hand(model, context, continuation):
  """(sum of log-probs, all argmax) of the continuation, from one forward pass of the request
  alone (zeros after it change nothing before them, and keep one compiled shape)."""
  ids = [*context, *continuation]
  tokens = np.zeros((1, model.config.max_seq_len), np.int32)
  tokens[0, : len(ids) - 1] = ids[:-1]
  logits = np.asarray(model.logits(tokens), np.float64)[0, : len(ids) - 1]
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  rows = np.arange(len(context) - 1, len(ids) - 1)
  targets = np.asarray(continuation)
  return logp[rows, targets].sum(), bool((logits[rows].argmax(-1) == targets).all())


def test_choice_metrics_equal_a_hand_computation(toy):
  """acc, acc_norm (characters and tokens) and acc_mutual_info of three questions, from the
  packed engine, equal the same metrics computed by hand from per-request forward passes."""
  tok = toy.tokenizer
  questions = [
    ("The sky is", [" blue", " green today", " a very large dog"], 0),
    ("Tom had a", [" ball", " red car and a hat", " cat"], 2),
    ("She went to the", [" park", " store", " moon and back again"], 1),
  ]
  flat = [(c, x) for c, xs, _ in questions for x in xs]
  conditional = requests.loglikelihood(toy, flat, batch_size=2)
  unconditional = requests.loglikelihood(toy, [("", x) for _, x in flat], batch_size=2)
  expected = {m: [] for m in choice.METRICS}
  got = {m: [] for m in choice.METRICS}
  k = 0
  for context, choices, answer in questions:
    rows = []
    for x in choices:
      hand = _by_hand(toy, *requests.encode_pair(tok, context, x))
      hand_unc = _by_hand(toy, *requests.encode_pair(tok, "", x))
      assert conditional[k][0] == pytest.approx(hand[0], abs=1e-4)
      assert conditional[k][1] == hand[1]
      assert unconditional[k][0] == pytest.approx(hand_unc[0], abs=1e-4)
      n_tokens = len(requests.encode_pair(tok, context, x)[1])
      rows.append((hand[0], hand_unc[0], len(x), n_tokens))
      k += 1
    lp, unc, chars, tokens = map(np.asarray, zip(*rows, strict=True))
    expected["acc"].append(int(np.argmax(lp)))
    expected["acc_norm"].append(int(np.argmax(lp / chars)))
    expected["acc_norm_tokens"].append(int(np.argmax(lp / tokens)))
    expected["acc_mutual_info"].append(int(np.argmax(lp - unc)))
    got_lp = np.asarray([s for s, _ in conditional[k - len(choices) : k]])
    got_unc = np.asarray([s for s, _ in unconditional[k - len(choices) : k]])
    q = choice.Question(got_lp, chars, tokens, answer, got_unc)
    for metric in choice.METRICS:
      got[metric].append(choice.predict(q, metric))
  assert got == expected
  # The metrics disagree somewhere, so each normalization is exercised.
  assert len({tuple(v) for v in expected.values()}) > 1
