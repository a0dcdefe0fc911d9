"""`jaxtune.load`: each format through one handle, against independent references: the text the
stories260K authors published, transformers' logits, and the same checkpoint loaded unsharded."""

import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import sentencepiece as spm
import torch
import transformers
from test_hf import CASES, TOKENS_BT, TOLERANCE, _edit_config, _hf_model, _torch_logits
from test_llama2c import FIRST_IDS, PUBLISHED

import jaxtune
from jaxtune import generate, sharding
from jaxtune.config import MeshConfig
from jaxtune.convert import export, hf
from jaxtune.data import llama2c_tokenizer
from jaxtune.data import tokenizer as tokenizer_lib
from jaxtune.errors import CheckpointError
from jaxtune.model import transformer


def _leaves(params):
  return jax.tree_util.tree_flatten_with_path(params)[0]


def test_top_level_import_is_light():
  """`import jaxtune` alone must not import JAX (the CLI's help and config stay fast)."""
  code = "import sys, jaxtune; assert 'jax' not in sys.modules, 'jax imported'; print('ok')"
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert result.stdout.strip() == "ok", result.stderr


def test_stories260K_decodes_the_published_text(data_dir):
  model = jaxtune.load(data_dir / "models" / "stories260K" / "stories260K.bin")
  tok = model.tokenizer
  assert isinstance(tok, llama2c_tokenizer.Tokenizer)  # tok512.bin, found beside the model.
  assert model.template == "raw" and model.mesh is None and model.config.kv_heads == 4
  steps = len(tok.encode(PUBLISHED, first=True))
  (out,) = model.generate([[tok.bos_id]], generate.Sampling(max_new_tokens=steps))
  ids = out.ids
  assert ids[:10] == FIRST_IDS
  assert tok.decode([tok.bos_id, *ids]).startswith(PUBLISHED)
  # Full recomputation through `logits` predicts the same tokens at every position.
  logits_btv = model.logits([[tok.bos_id, *ids[:-1]]])
  assert logits_btv.dtype == np.float32 and logits_btv.shape == (1, len(ids), 512)
  np.testing.assert_array_equal(np.argmax(logits_btv[0], -1), ids)


@pytest.mark.parametrize("case", ["llama-gqa", "gemma", "gpt2"])
def test_hf_folder_logits_equal_transformers(case, tmp_path):
  reference = _hf_model(case)
  reference.save_pretrained(tmp_path)
  model = jaxtune.load(tmp_path)
  assert model.tokenizer is None and model.template == "raw"
  assert model.config == hf.load_hf(tmp_path)[0]
  ours_btv = np.asarray(model.logits(TOKENS_BT))
  assert np.abs(ours_btv - _torch_logits(reference, TOKENS_BT)).max() < TOLERANCE


def test_hf_folder_tokenizer_model(data_dir, tmp_path):
  """A folder's tokenizer.model is read as SentencePiece, and must fit the model's vocabulary."""
  sp_model = data_dir / "tokenizers" / "llama2c" / "tokenizer.model"
  config = transformers.AutoConfig.for_model(
    "llama", **dict(CASES["llama-mha"][1], vocab_size=32000, num_hidden_layers=1)
  )
  transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "llama")
  shutil.copy(sp_model, tmp_path / "llama" / "tokenizer.model")
  model = jaxtune.load(tmp_path / "llama")
  assert isinstance(model.tokenizer, tokenizer_lib.Tokenizer)
  text = "Once upon a time, naïve café"
  reference = spm.SentencePieceProcessor(model_file=str(sp_model))
  assert model.tokenizer.encode(text, first=True) == reference.encode(text)
  assert (model.tokenizer.bos_id, model.tokenizer.eos_id) == (1, 2)

  _hf_model("qwen2").save_pretrained(tmp_path / "small")
  shutil.copy(sp_model, tmp_path / "small" / "tokenizer.model")
  with pytest.raises(CheckpointError, match="the tokenizer has 32000 tokens, more than the model"):
    jaxtune.load(tmp_path / "small")


def test_hf_weights_stored_in_bfloat16_load_in_bfloat16(tmp_path):
  _hf_model("llama-mha").to(torch.bfloat16).save_pretrained(tmp_path)
  model = jaxtune.load(tmp_path)
  assert model.config.param_dtype == "bfloat16"
  stored = safetensors.numpy.load_file(tmp_path / "model.safetensors")
  embedding = model.params["embed"]["embedding"]
  assert embedding.dtype == jnp.bfloat16
  np.testing.assert_array_equal(embedding, stored["model.embed_tokens.weight"])
  wide = jaxtune.load(tmp_path, param_dtype="float32")
  assert wide.config.param_dtype == "float32"
  np.testing.assert_array_equal(wide.params["embed"]["embedding"], embedding.astype(np.float32))


@pytest.fixture(scope="module")
def qwen2_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("qwen2")
  _hf_model("qwen2").save_pretrained(folder)
  return folder


@pytest.mark.parametrize("strategy", ["tp", "fsdp"])
def test_sharded_hf_load_reads_only_each_shard(qwen2_folder, strategy, monkeypatch):
  """On a 2 x 4 mesh every array equals the unsharded load, each device holds only its shard,
  and every read from the safetensors file is exactly one shard of one tensor."""
  whole = jaxtune.load(qwen2_folder)
  reads = []
  read = hf._Slice.__getitem__

  def recording(self, index):
    x = read(self, index)
    reads.append((self.name, x.size))
    return x

  monkeypatch.setattr(hf._Slice, "__getitem__", recording)
  mesh = sharding.make_mesh(MeshConfig(data=2, model=4))
  model = jaxtune.load(qwen2_folder, mesh=mesh, strategy=strategy)
  assert model.mesh is mesh and model.rules is not None

  abstract = jax.eval_shape(transformer.init_fn(model.module), jax.random.key(0))
  expected = sharding.variable_shardings(abstract, mesh, model.rules, strategy)["params"]
  split = 0
  shards_of = {}  # jaxtune path -> number of distinct shards.
  for (path, array), (_, want), (_, sharding_) in zip(
    _leaves(model.params), _leaves(whole.params), _leaves(expected), strict=True
  ):
    assert array.sharding.is_equivalent_to(sharding_, array.ndim), path
    np.testing.assert_array_equal(np.asarray(array), np.asarray(want))
    for shard in array.addressable_shards:
      assert shard.data.shape == sharding_.shard_shape(array.shape)
      np.testing.assert_array_equal(shard.data, np.asarray(want)[shard.index])
    split += sharding_.shard_shape(array.shape) != array.shape
    boxes = sharding_.devices_indices_map(array.shape).values()
    key = "/".join(k.key for k in path)
    shards_of[key] = len({tuple((s.start, s.stop) for s in box) for box in boxes})
  assert split >= (10 if strategy == "fsdp" else 6)

  cfg = model.config
  stored = safetensors.numpy.load_file(qwen2_folder / "model.safetensors")
  expected_read = {}
  for tensor in hf.FAMILIES["qwen2"].tensors(cfg):
    for name in tensor.names(cfg.num_layers):
      expected_read[name] = stored[name].size // shards_of[tensor.paths[0]]
  assert sorted(set(reads)) == sorted(expected_read.items())
  np.testing.assert_allclose(model.logits(TOKENS_BT), whole.logits(TOKENS_BT), atol=1e-5)


def test_run_directory_loads_with_the_source_logits(tmp_path):
  _hf_model("llama-gqa").save_pretrained(tmp_path / "hf")
  export.convert(tmp_path / "hf", tmp_path / "run", "jaxtune")
  source = jaxtune.load(tmp_path / "hf")
  run = jaxtune.load(tmp_path / "run")
  step = jaxtune.load(tmp_path / "run" / "checkpoints" / "0")
  assert run.config == source.config == step.config and run.template == "raw"
  for model in (run, step):
    jax.tree.map(np.testing.assert_array_equal, model.params, source.params)
    np.testing.assert_array_equal(model.logits(TOKENS_BT), source.logits(TOKENS_BT))

  mesh = sharding.make_mesh(MeshConfig(data=4, model=2))
  sharded = jaxtune.load(tmp_path / "run", mesh=mesh, strategy="fsdp")
  kernel = sharded.params["layers"]["mlp"]["up"]["kernel"]  # [L, D, F]: D on data, F on model.
  assert kernel.sharding.shard_shape(kernel.shape) == (2, 16, 64)
  np.testing.assert_allclose(sharded.logits(TOKENS_BT), source.logits(TOKENS_BT), atol=1e-5)

  narrow = jaxtune.load(tmp_path / "run", param_dtype="bfloat16")
  assert narrow.config.param_dtype == "bfloat16"
  expected = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), source.params)
  jax.tree.map(np.testing.assert_array_equal, narrow.params, expected)


def test_unknown_paths_are_clear_errors(tmp_path):
  with pytest.raises(CheckpointError, match=f"{tmp_path / 'nothing'}: no such file"):
    jaxtune.load(tmp_path / "nothing")
  (tmp_path / "notes.txt").write_text("hello")
  for path in (tmp_path, tmp_path / "notes.txt"):
    with pytest.raises(CheckpointError, match=f"{path}: not a checkpoint jaxtune reads"):
      jaxtune.load(path)
  (tmp_path / "checkpoints" / "7").mkdir(parents=True)
  (tmp_path / "config.yaml").write_text("model: {dim: 64}\n")
  with pytest.raises(CheckpointError, match=r"checkpoints/7/state: no such checkpoint"):
    jaxtune.load(tmp_path / "checkpoints" / "7")


def test_several_llama2c_tokenizers_are_ambiguous(data_dir, tmp_path):
  folder = data_dir / "models" / "stories260K"
  shutil.copy(folder / "stories260K.bin", tmp_path / "model.bin")
  shutil.copy(folder / "tok512.bin", tmp_path / "tok512.bin")
  shutil.copy(folder / "tok512.bin", tmp_path / "tok4096.bin")
  with pytest.raises(CheckpointError, match=r"several llama2.c tokenizers .*tok4096.bin"):
    jaxtune.load(tmp_path / "model.bin")
  model = jaxtune.load(tmp_path / "model.bin", tokenizer=str(tmp_path / "tok512.bin"))
  assert model.tokenizer.encode(PUBLISHED, first=True)[:10] == FIRST_IDS


def _broken(folder, tmp_path):
  return shutil.copytree(folder, tmp_path / "broken")


@pytest.mark.parametrize("mesh_shape", [None, (2, 4)])
def test_bad_hf_folders_are_clear_errors_sharded_or_not(qwen2_folder, tmp_path, mesh_shape):
  """The errors of test_hf.py, through `load` and the shard-by-shard reader."""
  mesh = mesh_shape and sharding.make_mesh(MeshConfig(*mesh_shape))
  broken = _broken(qwen2_folder, tmp_path)
  _edit_config(broken, intermediate_size=96)
  with pytest.raises(
    CheckpointError,
    match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' has shape",
  ):
    jaxtune.load(broken, mesh=mesh)
  _edit_config(broken, intermediate_size=128, model_type="mamba")
  with pytest.raises(CheckpointError, match=r"config\.json: unsupported model_type 'mamba'"):
    jaxtune.load(broken, mesh=mesh)
  _edit_config(broken, model_type="qwen2")
  path = broken / "model.safetensors"
  path.write_bytes(path.read_bytes()[:-100])
  with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated: tensor '[\w.]+'"):
    jaxtune.load(broken, mesh=mesh)
