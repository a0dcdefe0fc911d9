"""The model in parts, against `transformers` (PyTorch, CPU, float32): embeddings that are not
from the embedding table, hidden states, and the scalar head.

A tiny random Llama (GQA) built by transformers is imported with `load_hf`. A packed row holds
a segment of tokens, a segment of vectors spliced in place of tokens (as image features are),
and padding; each segment's logits must equal transformers' for that segment alone
(`input_ids`, then `inputs_embeds`). The scalar head must give what
`LlamaForSequenceClassification` (one label, its `score` weight) gives at the last token.
"""

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from test_hf import _SMALL

from jaxtune.convert import hf
from jaxtune.model import transformer

_CONFIG = dict(_SMALL, num_key_value_heads=2, pad_token_id=0)  # test_hf's tiny Llama, GQA.
TOLERANCE = 1e-4


def _hf_llama(tmp_path, cls=transformers.LlamaForCausalLM, **extra):
  config = transformers.LlamaConfig(**_CONFIG, **extra)
  torch.manual_seed(0)
  model = cls(config)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.eval()
  # jaxtune imports causal LMs and bare models: a classifier's body is the bare LlamaModel.
  saved = model if isinstance(model, transformers.LlamaForCausalLM) else model.model
  saved.save_pretrained(tmp_path, safe_serialization=True)
  cfg, variables = hf.load_hf(tmp_path)
  return model, cfg, jax.tree.map(jnp.asarray, variables["params"])


def test_embeddings_of_a_packed_segment_match_transformers_inputs_embeds(tmp_path):
  torch_model, cfg, params = _hf_llama(tmp_path)
  model = transformer.Transformer(cfg)
  rng = np.random.default_rng(0)
  tokens_t = rng.integers(1, 256, 5)
  vectors_sd = rng.normal(0, 0.5, (6, cfg.dim)).astype(np.float32)  # Not rows of the table.
  # [5 tokens | 6 vectors | 2 padding], one row.
  segment_ids_bt = jnp.asarray([[1] * 5 + [2] * 6 + [0] * 2])
  row_tokens_bt = jnp.asarray([[*tokens_t, *[0] * 8]])
  x_btd = model.apply({"params": params}, row_tokens_bt, method=transformer.Transformer.embed)
  x_btd = x_btd.at[0, 5:11].set(vectors_sd)
  logits_btv = jax.jit(lambda p, x, s: model.apply({"params": p}, None, None, s, embeddings_btd=x))(
    params, x_btd, segment_ids_bt
  )

  with torch.no_grad():
    ref_tokens = torch_model(input_ids=torch.as_tensor(tokens_t[None])).logits.numpy()
    ref_vectors = torch_model(inputs_embeds=torch.as_tensor(vectors_sd[None])).logits.numpy()
  np.testing.assert_allclose(logits_btv[:, :5], ref_tokens, atol=TOLERANCE)
  np.testing.assert_allclose(logits_btv[:, 5:11], ref_vectors, atol=TOLERANCE)
  # Passing the token embeddings is passing the tokens.
  np.testing.assert_allclose(
    model.apply({"params": params}, row_tokens_bt, None, segment_ids_bt),
    model.apply(
      {"params": params},
      None,
      None,
      segment_ids_bt,
      embeddings_btd=model.apply(
        {"params": params}, row_tokens_bt, method=transformer.Transformer.embed
      ),
    ),
    atol=1e-6,
  )


def test_hidden_states_and_scalar_head_match_transformers(tmp_path):
  torch_model, cfg, params = _hf_llama(
    tmp_path, transformers.LlamaForSequenceClassification, num_labels=1, tie_word_embeddings=True
  )
  score_d = torch_model.score.weight.detach().numpy()[0]
  params = dict(params, score={"kernel": jnp.asarray(score_d)})
  model = transformer.Transformer(cfg, scalar_head=True)
  # Right-padded rows of 9 and 6 tokens (pad id 0), as a reward model reads a batch.
  rng = np.random.default_rng(1)
  tokens_bt = rng.integers(1, 256, (2, 9))
  tokens_bt[1, 6:] = 0
  segment_ids_bt = (tokens_bt != 0).astype(np.int32)

  hidden_btd = model.apply({"params": params}, tokens_bt, None, segment_ids_bt, head="hidden")
  score_bt = model.apply({"params": params}, tokens_bt, None, segment_ids_bt, head="score")
  with torch.no_grad():
    ids = torch.as_tensor(tokens_bt)
    mask = torch.as_tensor(segment_ids_bt)
    ref_hidden = torch_model.model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    ref_reward_b = torch_model(input_ids=ids, attention_mask=mask).logits.numpy()[:, 0]
  real_bt = segment_ids_bt.astype(bool)
  np.testing.assert_allclose(hidden_btd[real_bt], ref_hidden[real_bt], atol=TOLERANCE)
  last_b = segment_ids_bt.sum(axis=1) - 1
  np.testing.assert_allclose(score_bt[np.arange(2), last_b], ref_reward_b, atol=TOLERANCE)
  assert score_bt.shape == (2, 9) and score_bt.dtype == jnp.float32
  # The output layer of the hidden states is the logits.
  np.testing.assert_allclose(
    model.apply({"params": params}, hidden_btd, method=transformer.Transformer.logits),
    model.apply({"params": params}, tokens_bt, None, segment_ids_bt),
    atol=1e-5,
  )
