"""`jaxtune convert`: round trips bit for bit, GQA/MQA pooling against numpy on the Hugging Face
layout, what transformers and the trainer make of the results, and refusals."""

import dataclasses
import json

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from subprocesses import jaxtune as jaxtune_cli
from subprocesses import one_device_env
from test_hf import (
  CASES,
  TOKENS_BT,
  _hf_model,
  _random_variables,
  _torch_logits,
  _transformers_warnings,
)

import jaxtune
from jaxtune import api
from jaxtune.config_model import ModelConfig
from jaxtune.convert import export, hf
from jaxtune.errors import CheckpointError, ConfigError
from jaxtune.model import transformer


def _tensors(folder):
  """The stored weights of a folder (buffers such as GPT-2's causal mask left out)."""
  tensors = safetensors.numpy.load_file(folder / "model.safetensors")
  return {k: v for k, v in tensors.items() if not hf._BUFFERS.search(k)}


def _load_in_transformers(folder):
  """The folder as transformers loads it, asserting that it warned of nothing."""
  with _transformers_warnings() as records:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
      folder, output_loading_info=True, dtype=torch.float32, attn_implementation="eager"
    )
  assert not any(info.values()), info  # Missing, unexpected, mismatched keys; errors.
  assert not records, [r.getMessage() for r in records]
  return model.eval()


def _jaxtune(*args, cwd=None):
  return jaxtune_cli(*args, cwd=cwd, env=one_device_env())


@pytest.mark.parametrize("case", ["llama-gqa", "gpt2"])
def test_hf_to_jaxtune_to_hf_is_the_identity(case, tmp_path):
  reference = _hf_model(case)
  reference.save_pretrained(tmp_path / "src")
  export.convert(tmp_path / "src", tmp_path / "run", "jaxtune")
  export.convert(tmp_path / "run", tmp_path / "out", "hf")
  source, out = _tensors(tmp_path / "src"), _tensors(tmp_path / "out")
  assert out.keys() == source.keys()
  for name, x in source.items():
    assert out[name].dtype == x.dtype
    np.testing.assert_array_equal(out[name], x, name)
  exported = _load_in_transformers(tmp_path / "out")
  np.testing.assert_array_equal(
    _torch_logits(exported, TOKENS_BT), _torch_logits(reference, TOKENS_BT)
  )


def test_kv_heads_pool_the_hf_tensors_like_numpy(tmp_path):
  """K/V heads of 8 pooled into 2 (GQA) in the Hugging Face layout [K*H, D], computed here head
  by head; every other tensor is kept bit for bit; 8 into 8 changes nothing."""
  _hf_model("llama-mha").save_pretrained(tmp_path / "src")
  export.convert(tmp_path / "src", tmp_path / "gqa", "hf", kv_heads=2)
  export.convert(tmp_path / "src", tmp_path / "same", "hf", kv_heads=8)
  source, pooled = _tensors(tmp_path / "src"), _tensors(tmp_path / "gqa")
  h, d = 8, 64
  for name, x in source.items():
    if name.endswith(("k_proj.weight", "v_proj.weight")):
      heads = x.astype(np.float64).reshape(8, h, d)
      expected = np.concatenate([heads[4 * j : 4 * j + 4].mean(0) for j in range(2)])
      np.testing.assert_allclose(pooled[name], expected, rtol=1e-6, atol=1e-7)
    else:
      np.testing.assert_array_equal(pooled[name], x)
  for name, x in _tensors(tmp_path / "same").items():
    np.testing.assert_array_equal(x, source[name])
  config = json.loads((tmp_path / "gqa" / "config.json").read_text())
  assert (config["num_attention_heads"], config["num_key_value_heads"]) == (8, 2)
  gqa = _load_in_transformers(tmp_path / "gqa")
  assert gqa.config.num_key_value_heads == 2
  np.testing.assert_allclose(
    _torch_logits(gqa, TOKENS_BT), jaxtune.load(tmp_path / "gqa").logits(TOKENS_BT), atol=1e-4
  )


def test_mqa_conversion_shrinks_the_kv_cache_num_heads_times(tmp_path):
  _hf_model("llama-mha").save_pretrained(tmp_path / "src")
  export.convert(tmp_path / "src", tmp_path / "mqa", "jaxtune", kv_heads=1)
  source, mqa = jaxtune.load(tmp_path / "src"), jaxtune.load(tmp_path / "mqa")
  assert (mqa.config.num_heads, mqa.config.kv_heads) == (8, 1)

  def cache_bytes(model):
    cache = transformer.init_cache(model.module, batch=2, max_length=32)
    return sum(x.nbytes for x in jax.tree.leaves((cache["key"], cache["value"])))

  assert cache_bytes(source) == 8 * cache_bytes(mqa)
  k_ldkh = mqa.params["layers"]["attn"]["k"]["kernel"]
  np.testing.assert_allclose(
    k_ldkh[:, :, 0], source.params["layers"]["attn"]["k"]["kernel"].mean(2), atol=1e-6
  )


def test_dtype_of_the_written_parameters(tmp_path):
  _hf_model("qwen2").save_pretrained(tmp_path / "src")
  export.convert(tmp_path / "src", tmp_path / "bf16", "hf", dtype="bfloat16")
  export.convert(tmp_path / "src", tmp_path / "fp16", "hf", dtype="float16")
  export.convert(tmp_path / "bf16", tmp_path / "run", "jaxtune")  # bfloat16 as stored.
  source = _tensors(tmp_path / "src")
  for folder, dtype in (("bf16", ml_dtypes.bfloat16), ("fp16", np.float16)):
    for name, x in _tensors(tmp_path / folder).items():
      assert x.dtype == dtype
      np.testing.assert_array_equal(x, source[name].astype(dtype))
  run = jaxtune.load(tmp_path / "run")
  assert run.config.param_dtype == "bfloat16"
  assert {x.dtype for x in jax.tree.leaves(run.params)} == {np.dtype(ml_dtypes.bfloat16)}


def test_sentencepiece_tokenizer_is_exported_for_transformers(data_dir, tmp_path):
  sp_model = data_dir / "tokenizers" / "llama2c" / "tokenizer.model"
  config = transformers.AutoConfig.for_model(
    "llama", **dict(CASES["llama-mha"][1], vocab_size=32000, num_hidden_layers=1)
  )
  transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "src")
  (tmp_path / "src" / "tokenizer.model").write_bytes(sp_model.read_bytes())
  export.convert(tmp_path / "src", tmp_path / "run", "jaxtune")
  run = jaxtune.load(tmp_path / "run")
  tok = run.tokenizer.with_special_tokens(["<EOT>"])  # As the LIMA template adds it.
  grown = transformer.grow_vocab(run.params, tok.vocab_size)
  cfg = dataclasses.replace(run.config, vocab_size=tok.vocab_size)
  export.save_run(api.Model(cfg, grown, tok), tmp_path / "run_eot")
  export.convert(tmp_path / "run_eot", tmp_path / "out", "hf")
  assert (tmp_path / "out" / "tokenizer.model").read_bytes() == sp_model.read_bytes()
  theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
  text = "Once upon a time, there was a little girl named Lily."
  ours = jaxtune.load(tmp_path / "out").tokenizer
  assert theirs(text)["input_ids"] == [ours.bos_id, *ours.encode(text, first=True)]
  assert theirs.convert_tokens_to_ids("<EOT>") == ours.special_id("<EOT>") == 32000


def test_refusals_leave_nothing_behind(tmp_path):
  _hf_model("llama-mha").save_pretrained(tmp_path / "src")
  with pytest.raises(ConfigError, match="cannot pool 8 KV heads into 3"):
    export.convert(tmp_path / "src", tmp_path / "out", "hf", kv_heads=3)
  with pytest.raises(ConfigError, match="not float16"):
    export.convert(tmp_path / "src", tmp_path / "out", "jaxtune", dtype="float16")
  assert not (tmp_path / "out").exists()
  # A model no Hugging Face family computes fails while writing: the partial output is removed.
  cfg = ModelConfig(vocab_size=256, dim=64, num_heads=8, mlp_dim=128, parallel_block=True)
  params = nn.meta.unbox(_random_variables(cfg, seed=0))["params"]
  export.save_run(api.Model(cfg, params, None), tmp_path / "palm")
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointError, match="no Hugging Face equivalent.*parallel_block"):
    export.convert(tmp_path / "palm", tmp_path / "empty", "hf")
  assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())


def test_cli_converts_and_refuses_to_overwrite(data_dir, tmp_path):
  """End to end as a user runs it: stories260K to a GQA-uptraining start (2 KV heads), which
  `jaxtune train train.init_from=` fine-tunes and `jaxtune.load` reads; then an occupied
  destination is one clear line."""
  stories = data_dir / "models" / "stories260K" / "stories260K.bin"
  start = tmp_path / "start"
  result = _jaxtune("convert", str(stories), str(start), "--to", "jaxtune", "--kv-heads", "2")
  assert result.returncode == 0, result.stderr
  assert "pooled 4 KV heads into 2" in result.stderr
  assert (start / "tokenizer" / "tokenizer.bin").is_file()
  tuned = tmp_path / "tuned"
  result = _jaxtune(
    "train",
    "model.preset=stories260K",
    "model.num_kv_heads=2",
    f"data.tokenizer={start / 'tokenizer'}",
    "data.synthetic_examples=40",
    "data.template=llama2",
    "data.max_length=128",
    f"train.init_from={start}",
    "train.steps=1",
    "train.batch_size=8",
    "train.learning_rate=1e-9",
    "train.warmup_steps=0",
    f"train.output_dir={tuned}",
    cwd=tmp_path,
  )
  assert result.returncode == 0, result.stderr
  converted, trained = jaxtune.load(start), jaxtune.load(tuned)
  assert converted.config.kv_heads == trained.config.kv_heads == 2
  assert trained.template == "llama2" and converted.template == "raw"
  # One step at a learning rate of 1e-9: the trainer started from the converted parameters.
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), trained.params, converted.params
  )

  result = _jaxtune("convert", str(stories), str(start), "--to", "hf")
  assert result.returncode == 2
  assert "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
    f"jaxtune convert: error: {start}: already exists and is not empty; convert into a new "
    "directory"
  )
  assert not (start / "config.json").exists()
