"""Hugging Face import and export against `transformers` itself (PyTorch, CPU, float32).

Small random models are built by transformers, saved with `save_pretrained`, imported with
`load_hf` and compared logit by logit; the import is then exported with `save_hf`, re-imported
(exactly the same arrays and config) and loaded back into transformers (no load warnings, same
logits). Every parameter is perturbed, so biases, norm weights and Gemma's `1 + w` are all checked.
"""

import contextlib
import dataclasses
import json
import logging
import pickle
import re
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from jaxtune.config_model import ModelConfig
from jaxtune.convert import hf
from jaxtune.errors import CheckpointError
from jaxtune.model import transformer

_SMALL = dict(
  vocab_size=256,
  hidden_size=64,
  intermediate_size=128,
  num_hidden_layers=2,
  num_attention_heads=8,
  max_position_embeddings=128,
)
# model_type and config.json keys of each case.
CASES = {
  "llama-mha": ("llama", dict(_SMALL, num_key_value_heads=8, rms_norm_eps=1e-5)),
  "llama-gqa": (
    "llama",
    dict(_SMALL, num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=True),
  ),
  "llama-mqa": ("llama", dict(_SMALL, num_key_value_heads=1, head_dim=16)),
  "mistral": ("mistral", dict(_SMALL, num_key_value_heads=2, sliding_window=64)),
  "qwen2": ("qwen2", dict(_SMALL, num_key_value_heads=2)),
  "gemma": ("gemma", dict(_SMALL, num_key_value_heads=1, head_dim=16)),
  "gpt2": (
    "gpt2",
    dict(
      vocab_size=256,
      n_embd=64,
      n_layer=2,
      n_head=8,
      n_positions=128,
      bos_token_id=0,
      eos_token_id=0,
    ),
  ),
}
TOKENS_BT = np.random.default_rng(0).integers(0, 256, (2, 16))
TOLERANCE = 1e-4


def _hf_model(case: str, seed: int = 0) -> torch.nn.Module:
  model_type, kwargs = CASES[case]
  config = transformers.AutoConfig.for_model(model_type, **kwargs)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def _torch_logits(model: torch.nn.Module, tokens_bt: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.as_tensor(tokens_bt)).logits.numpy()


@contextlib.contextmanager
def _transformers_warnings():
  """Collects the warnings transformers logs (its loggers do not propagate to the root).

  Forgets the warnings it logs only once, so that one logged by an earlier test is seen again.
  """
  transformers.utils.logging.warning_once.cache_clear()
  records = []
  handler = logging.Handler(logging.WARNING)
  handler.emit = records.append
  log = logging.getLogger("transformers")
  log.addHandler(handler)
  try:
    yield records
  finally:
    log.removeHandler(handler)


def _random_variables(cfg: ModelConfig, seed: int):
  """Variables shaped and boxed as `Transformer(cfg).init` makes them (jax arrays), without
  compiling the initializer."""
  abstract = jax.eval_shape(transformer.init_fn(transformer.Transformer(cfg)), jax.random.key(0))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape, s.dtype)), abstract)


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("case", CASES)
def test_logit_parity_export_and_round_trip(case, tmp_path):
  reference = _hf_model(case)
  reference.save_pretrained(tmp_path / "hf")
  cfg, variables = hf.load_hf(tmp_path / "hf")

  model = transformer.Transformer(cfg)
  abstract = nn.meta.unbox(jax.eval_shape(transformer.init_fn(model), jax.random.key(0)))
  assert jax.tree.map(lambda x: (x.shape, x.dtype), variables) == jax.tree.map(
    lambda x: (x.shape, x.dtype), abstract
  )
  ours_btv = np.asarray(jax.jit(model.apply)(variables, TOKENS_BT))
  theirs_btv = _torch_logits(reference, TOKENS_BT)
  assert np.abs(theirs_btv).max() > 1.0  # Logits large enough for the tolerance to mean something.
  assert np.abs(ours_btv - theirs_btv).max() < TOLERANCE

  hf.save_hf(cfg, variables, tmp_path / "out")
  cfg_again, variables_again = hf.load_hf(tmp_path / "out")
  assert cfg_again == cfg
  _assert_trees_equal(variables_again, variables)

  with _transformers_warnings() as records:
    exported, info = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / "out", output_loading_info=True, dtype=torch.float32, attn_implementation="eager"
    )
  assert not any(info.values()), info  # Missing, unexpected, mismatched keys; errors.
  assert not records, [r.getMessage() for r in records]
  assert np.abs(_torch_logits(exported.eval(), TOKENS_BT) - ours_btv).max() < TOLERANCE


def test_config_mapping():
  """Fields read from config.json, beyond what the parity test exercises."""
  checks = {
    "llama-gqa": dict(num_kv_heads=2, rope_theta=500000.0, tie_embeddings=True, head_dim=None),
    "llama-mqa": dict(num_kv_heads=1, head_dim=16, tie_embeddings=False, norm_eps=1e-6),
    "mistral": dict(max_seq_len=64),  # Capped at the sliding window.
    "qwen2": dict(qkv_bias=True, use_bias=False),
    "gemma": dict(mlp="geglu", scale_embeddings=True, tie_embeddings=True),
    "gpt2": dict(position="learned", use_bias=True, norm="layernorm", mlp="gelu", max_seq_len=128),
  }
  for case, expected in checks.items():
    model_type, kwargs = CASES[case]
    hf_config = transformers.AutoConfig.for_model(model_type, **kwargs).to_dict()
    family = hf.FAMILIES[model_type]
    cfg = ModelConfig(**family.to_config(hf_config))
    assert {k: getattr(cfg, k) for k in expected} == expected, case


def test_transformers4_config_keys():
  """Older config.json files keep rope_theta at the top level and may carry rope_scaling."""
  old = dict(_SMALL, model_type="llama", rope_theta=123.0, rope_scaling=None)
  assert hf.FAMILIES["llama"].to_config(old)["rope_theta"] == 123.0
  with pytest.raises(CheckpointError, match="RoPE scaling 'llama3'"):
    hf.FAMILIES["llama"].to_config(dict(old, rope_scaling=dict(rope_type="llama3", factor=8.0)))


def test_sharded_checkpoint_matches_single_file(tmp_path):
  reference = _hf_model("llama-gqa")
  reference.save_pretrained(tmp_path / "one")
  reference.save_pretrained(tmp_path / "sharded", max_shard_size="60KB")
  assert (tmp_path / "sharded" / hf.INDEX).exists()
  assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
  cfg_one, one = hf.load_hf(tmp_path / "one")
  cfg_sharded, sharded = hf.load_hf(tmp_path / "sharded")
  assert cfg_sharded == cfg_one
  _assert_trees_equal(sharded, one)


def test_bare_base_model_names_and_stored_buffers(tmp_path):
  """GPT-2 as on the Hub: `h.0.attn.c_attn.weight` (no `transformer.`) and causal-mask buffers."""
  _hf_model("gpt2").save_pretrained(tmp_path)
  cfg, expected = hf.load_hf(tmp_path)
  path = tmp_path / "model.safetensors"
  tensors = {
    k.removeprefix("transformer."): v for k, v in safetensors.numpy.load_file(path).items()
  }
  tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 128, 128), np.float32))
  safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})
  cfg_bare, bare = hf.load_hf(tmp_path)
  assert cfg_bare == cfg
  _assert_trees_equal(bare, expected)


def test_jaxtune_params_export_in_bfloat16(tmp_path):
  cfg = ModelConfig(
    vocab_size=256, dim=64, num_heads=8, num_kv_heads=2, mlp_dim=128, tie_embeddings=False
  )
  boxed = _random_variables(cfg, seed=1)
  hf.save_hf(cfg, boxed, tmp_path, dtype="bfloat16")
  written = json.loads((tmp_path / "config.json").read_text())
  assert (written["model_type"], written["architectures"]) == ("llama", ["LlamaForCausalLM"])
  cfg_again, loaded = hf.load_hf(tmp_path, param_dtype="bfloat16")
  assert cfg_again == dataclasses.replace(cfg, param_dtype="bfloat16")
  expected = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), nn.meta.unbox(boxed))
  _assert_trees_equal(loaded, expected)
  _, widened = hf.load_hf(tmp_path)  # float32 by default: bfloat16 widens exactly.
  _assert_trees_equal(widened, jax.tree.map(lambda x: x.astype(np.float32), expected))


@pytest.mark.parametrize(
  "overrides, field",
  [
    (dict(parallel_block=True), "parallel_block"),
    (dict(norm="layernorm"), "norm"),
    (dict(scale_tied_logits=True), "scale_tied_logits"),
    (dict(use_bias=True, position="learned", norm="layernorm", mlp="gelu"), "num_kv_heads"),
  ],
)
def test_save_hf_refuses_models_without_hf_equivalent(overrides, field, tmp_path):
  cfg = ModelConfig(num_kv_heads=2, **overrides)
  with pytest.raises(CheckpointError, match=f"no Hugging Face equivalent.*model.{field}="):
    hf.save_hf(cfg, {}, tmp_path / "out")
  assert not (tmp_path / "out").exists()


def test_save_hf_refuses_params_that_do_not_match_the_config(tmp_path):
  cfg = ModelConfig(vocab_size=256, dim=64, num_heads=8, mlp_dim=128)
  variables = _random_variables(cfg, seed=0)
  with pytest.raises(CheckpointError, match="layers/mlp/up/kernel is"):
    hf.save_hf(ModelConfig(vocab_size=256, dim=64, num_heads=8, mlp_dim=96), variables, tmp_path)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("llama")
  _hf_model("llama-mha").save_pretrained(folder)
  return folder


@pytest.fixture
def broken(llama_folder, tmp_path):
  """A copy of a good checkpoint to break."""
  return shutil.copytree(llama_folder, tmp_path / "broken")


def _edit_config(folder, **changes):
  path = folder / "config.json"
  path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def _edit_tensors(folder, edit):
  path = folder / "model.safetensors"
  tensors = safetensors.numpy.load_file(path)
  edit(tensors)
  safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})


def test_truncated_safetensors(broken):
  path = broken / "model.safetensors"
  path.write_bytes(path.read_bytes()[:-100])
  with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated: tensor '[\w.]+'"):
    hf.load_hf(broken)
  path.write_bytes(b"\xff" * 64)
  with pytest.raises(CheckpointError, match=r"model\.safetensors: the safetensors header claims"):
    hf.load_hf(broken)
  path.write_bytes((9).to_bytes(8, "little") + b"{not json")
  with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt safetensors header"):
    hf.load_hf(broken)


def test_unsupported_model_type_and_architecture(broken):
  _edit_config(broken, model_type="mamba")
  with pytest.raises(CheckpointError, match=r"config\.json: unsupported model_type 'mamba'"):
    hf.load_hf(broken)
  _edit_config(broken, model_type="llama", architectures=["LlamaForSequenceClassification"])
  with pytest.raises(CheckpointError, match="unsupported architecture"):
    hf.load_hf(broken)
  _edit_config(broken, architectures=["LlamaForCausalLM"], hidden_act="relu")
  with pytest.raises(CheckpointError, match="hidden_act='relu' has no jaxtune equivalent"):
    hf.load_hf(broken)


def test_tensor_shape_must_match_config(broken):
  _edit_config(broken, intermediate_size=96)
  with pytest.raises(
    CheckpointError,
    match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' has shape "
    r"\[128, 64\], but config\.json implies \[96, 64\]",
  ):
    hf.load_hf(broken)


def test_missing_and_unexpected_tensors(broken):
  _edit_tensors(broken, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
  with pytest.raises(CheckpointError, match="missing tensor 'model.layers.1.self_attn.k_proj"):
    hf.load_hf(broken)
  _edit_tensors(
    broken,
    lambda t: t.update(
      {
        "model.layers.1.self_attn.k_proj.weight": np.zeros((64, 64), np.float32),
        "model.layers.0.self_attn.q_norm.weight": np.ones(8, np.float32),
      }
    ),
  )
  with pytest.raises(CheckpointError, match="does not have, e.g. model.layers.0.self_attn.q_norm"):
    hf.load_hf(broken)


class _Sentinel:
  """Unpickling this creates a file: proof, if it exists, that a pickle was loaded."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (open, (str(self.path), "w"))


def test_pickled_checkpoints_are_refused_not_loaded(broken, tmp_path):
  (broken / "model.safetensors").unlink()
  sentinel = tmp_path / "unpickled"
  (broken / "pytorch_model.bin").write_bytes(pickle.dumps(_Sentinel(sentinel)))
  with pytest.raises(CheckpointError, match=r"only pickled weights \(pytorch_model\.bin\)"):
    hf.load_hf(broken)
  assert not sentinel.exists()


@pytest.mark.parametrize("case", ["llama-mqa", "qwen2", "gemma", "gpt2"])
def test_views_read_any_box_as_the_whole_tensor_would(case):
  """`View.read` of a box (a device's shard) equals the box of the whole converted tensor, for
  every tensor layout (transposes, head splits, GPT-2's fused q/k/v, Gemma's offset), and
  `to_hf` inverts the whole conversion."""
  model_type, kwargs = CASES[case]
  family = hf.FAMILIES[model_type]
  cfg = ModelConfig(
    **family.to_config(transformers.AutoConfig.for_model(model_type, **kwargs).to_dict())
  )
  rng = np.random.default_rng(0)
  for tensor in family.tensors(cfg):
    w = rng.standard_normal(tensor.shape).astype(np.float32)
    whole = tensor.from_hf(w)
    exact = all(view.offset == 0 for view in tensor.views)  # w + 1 - 1 rounds in float32.
    np.testing.assert_allclose(tensor.to_hf(*whole), w, rtol=0, atol=0 if exact else 1e-6)
    for view, array in zip(tensor.views, whole, strict=True):
      assert array.shape == view.shape, tensor.name
      for _ in range(10):
        box = []
        for n in view.shape:
          start = int(rng.integers(0, n))
          box.append(slice(start, int(rng.integers(start + 1, n + 1))))
        box = tuple(box)
        np.testing.assert_array_equal(view.read(w, tensor.shape, box), array[box], tensor.name)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/hostname", "a/../../x"])
def test_index_shards_outside_the_folder_are_refused(broken, shard):
  outside = broken.parent / "outside.safetensors"  # A readable file outside the folder.
  shutil.copy(broken / "model.safetensors", outside)
  names = safetensors.numpy.load_file(broken / "model.safetensors")
  (broken / hf.INDEX).write_text(json.dumps({"weight_map": dict.fromkeys(names, shard)}))
  with pytest.raises(CheckpointError, match=rf"{hf.INDEX}: shard '{re.escape(shard)}' is outside"):
    hf.load_hf(broken)
