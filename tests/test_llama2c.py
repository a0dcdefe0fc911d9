"""The golden test: the real stories260K checkpoint reproduces its authors' published text."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.convert import llama2c
from jaxtune.data import llama2c_tokenizer
from jaxtune.errors import CheckpointError, DataError
from jaxtune.model import transformer
from jaxtune.peft import partition

PUBLISHED = (
  "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
  "One day, she saw a big, red ball. She wanted to play with it, but it was too high."
)
FIRST_IDS = [403, 407, 261, 378, 432, 383, 286, 261, 376, 298]


@pytest.fixture(scope="module")
def stories(data_dir):
  folder = data_dir / "models" / "stories260K"
  cfg, variables = llama2c.load_model(str(folder / "stories260K.bin"))
  return cfg, variables, llama2c_tokenizer.Tokenizer.load(str(folder / "tok512.bin"))


def _greedy_with_cache(model, variables, steps):
  cache = transformer.init_cache(model, batch=1, max_length=steps + 1)
  step = jax.jit(
    lambda c, x, p: model.apply({**variables, "cache": c}, x, p, decode=True, mutable=["cache"])
  )
  ids = [1]
  for i in range(steps):
    logits, mutated = step(cache, jnp.array([[ids[-1]]]), jnp.array([[i]]))
    cache = mutated["cache"]
    ids.append(int(jnp.argmax(logits[0, -1])))
  return ids


def test_golden_greedy_decode(stories):
  cfg, variables, tok = stories
  assert (cfg.dim, cfg.num_layers, cfg.num_heads, cfg.kv_heads, cfg.mlp_dim) == (64, 5, 8, 4, 172)
  assert partition.count(variables) == 260_032
  model = transformer.Transformer(cfg)
  ids = _greedy_with_cache(model, variables, steps=len(tok.encode(PUBLISHED, first=True)) + 2)
  assert ids[1:11] == FIRST_IDS
  assert tok.decode(ids).startswith(PUBLISHED)
  # Full recomputation agrees with the cached decode at every position.
  full = jax.jit(model.apply)(variables, jnp.array([ids]))
  np.testing.assert_array_equal(np.argmax(full[0, :-1], -1), ids[1:])


def test_tokenizer_round_trip(stories):
  *_, tok = stories
  ids = [tok.bos_id] + tok.encode(PUBLISHED, first=True)
  assert ids[1:11] == FIRST_IDS
  assert tok.decode(ids) == PUBLISHED
  assert tok.decode(tok.encode("naïve café ☕", first=True)) == "naïve café ☕"  # Byte fallback.


def test_word_by_word_encoding_equals_whole_text_bpe(stories):
  *_, tok = stories
  rng = np.random.default_rng(0)
  words = ["Once", "upon", " a", "time", "Lily", "the", "  ", "\n", "ball,", "red", "x", "é"]
  for _ in range(100):
    text = "".join(str(rng.choice(["", " "])) + str(rng.choice(words)) for _ in range(12))
    assert tok.encode(text, first=True) == list(tok._bpe(" " + text)), text


def test_added_special_tokens_round_trip(stories, tmp_path):
  *_, tok = stories
  tok = tok.with_special_tokens(["<EOT>"])
  assert tok.special_id("<EOT>") == 512 and tok.vocab_size == 513
  ids = tok.encode("Hi there", first=True) + [512] + tok.encode(" ok")
  assert tok.decode(ids) == "Hi there<EOT> ok"
  tok.save(str(tmp_path))
  again = llama2c_tokenizer.Tokenizer.load(str(tmp_path / llama2c_tokenizer.TOKENIZER_FILE))
  assert again.encode(PUBLISHED, first=True) == tok.encode(PUBLISHED, first=True)
  assert again.special_id("<EOT>") == 512


def test_corrupt_checkpoints_are_clear_errors(stories, data_dir, tmp_path):
  blob = (data_dir / "models" / "stories260K" / "stories260K.bin").read_bytes()
  truncated = tmp_path / "truncated.bin"
  truncated.write_bytes(blob[:-100])
  with pytest.raises(CheckpointError, match="truncated"):
    llama2c.load_model(str(truncated))
  garbage = tmp_path / "garbage.bin"
  garbage.write_bytes(b"\xff" * 64)
  with pytest.raises(CheckpointError, match="implausible"):
    llama2c.load_model(str(garbage))
  bad_tok = tmp_path / "tok.bin"
  bad_tok.write_bytes((data_dir / "models" / "stories260K" / "tok512.bin").read_bytes()[:2000])
  with pytest.raises(DataError, match="corrupt llama2.c tokenizer"):
    llama2c_tokenizer.Tokenizer.load(str(bad_tok))
