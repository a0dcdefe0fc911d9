"""The ViT encoder against transformers' `CLIPVisionModel` and `SiglipVisionModel` (random tiny
ones, every parameter perturbed), on random images: every hidden state within 1e-4."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from jaxtune.config_vision import VisionConfig
from jaxtune.convert import hf_vision
from jaxtune.errors import CheckpointError
from jaxtune.model import vision

_TOWER = dict(
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=3,
  num_attention_heads=4,
  image_size=16,
  patch_size=4,
  num_channels=3,
)
TOWERS = {
  "clip": (transformers.CLIPVisionConfig, transformers.CLIPVisionModel),
  "siglip": (transformers.SiglipVisionConfig, transformers.SiglipVisionModel),
}


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """Every parameter moved off its initial value (LayerNorms start at 1 and 0)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=gen))
  return model.eval()


def tower(kind: str, **overrides) -> torch.nn.Module:
  config_cls, model_cls = TOWERS[kind]
  torch.manual_seed(0)
  return perturbed(model_cls(config_cls(**(_TOWER | overrides))))


def images(n: int, size: int = 16, seed: int = 1) -> np.ndarray:
  """Random normalized images [n, Y, X, C]."""
  return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def hf_hidden(model: torch.nn.Module, pixels_byxc: np.ndarray):
  with torch.no_grad():
    out = model(torch.from_numpy(pixels_byxc).permute(0, 3, 1, 2), output_hidden_states=True)
  return [h.numpy() for h in out.hidden_states], out.last_hidden_state.numpy()


@pytest.mark.parametrize("kind", list(TOWERS))
def test_features_match_transformers(kind, tmp_path):
  model = tower(kind)
  model.save_pretrained(tmp_path)
  cfg, variables = hf_vision.load_vision(tmp_path)
  assert (cfg.class_token, cfg.pre_norm, cfg.patch_bias) == (
    (True, True, False) if kind == "clip" else (False, False, True)
  )
  pixels = images(2)
  theirs, last = hf_hidden(model, pixels)
  encoder = vision.VisionEncoder(cfg)
  ours = np.asarray(jax.jit(encoder.apply)(variables, jnp.asarray(pixels)))
  assert ours.shape == (cfg.num_layers + 1, 2, cfg.num_positions, cfg.dim)
  for i, h in enumerate(theirs):
    np.testing.assert_allclose(ours[i], h, atol=1e-4, rtol=0, err_msg=f"hidden state {i}")
  if kind == "siglip":  # SigLIP's last_hidden_state is post-normed; CLIP's is not.
    post = encoder.apply(variables, jnp.asarray(ours[-1]), method="last_hidden")
    np.testing.assert_allclose(np.asarray(post), last, atol=1e-4, rtol=0)


def test_init_matches_the_import_layout(tmp_path):
  """A freshly initialized encoder has exactly the arrays an import gives."""
  tower("clip").save_pretrained(tmp_path)
  cfg, variables = hf_vision.load_vision(tmp_path)
  abstract = nn.meta.unbox(jax.eval_shape(vision.init_fn(cfg), jax.random.key(0)))
  shapes = jax.tree.map(lambda x: x.shape, abstract)
  assert shapes == jax.tree.map(np.shape, variables)


def test_unknown_tensor_and_bad_config_are_refused(tmp_path):
  model = tower("clip")
  model.save_pretrained(tmp_path)
  path = tmp_path / "model.safetensors"
  tensors = safetensors.numpy.load_file(path)
  safetensors.numpy.save_file(tensors | {"extra.weight": np.zeros(2, np.float32)}, path)
  with pytest.raises(CheckpointError, match="extra.weight"):
    hf_vision.load_vision(tmp_path)
  with pytest.raises(CheckpointError, match="patch_size"):
    hf_vision.vision_config(
      {"model_type": "clip_vision_model", **_TOWER, "patch_size": 5}, "x/config.json"
    )


def test_config_validation():
  with pytest.raises(ValueError, match="num_heads"):
    VisionConfig(dim=30, num_heads=4).validate()
