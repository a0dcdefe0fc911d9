"""LLaVA against transformers' `LlavaForConditionalGeneration` (a random tiny one: CLIP tower,
mlp2x_gelu projector, Llama decoder, every parameter perturbed): logits on a prompt with an
image, greedy generation with an image; and the splice against a NumPy reference."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from test_llava_train import CharTokenizer
from test_vision import _TOWER, images, perturbed

import jaxtune
from jaxtune import cli
from jaxtune.convert import hf_vision
from jaxtune.data.formats import Message
from jaxtune.errors import CheckpointError, GenerationError
from jaxtune.model import llava

IMAGE_TOKEN = 250
_TEXT = dict(
  vocab_size=256,
  hidden_size=64,
  intermediate_size=128,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  max_position_embeddings=128,
)


@functools.cache
def hf_llava() -> transformers.LlavaForConditionalGeneration:
  torch.manual_seed(0)
  config = transformers.LlavaConfig(
    vision_config=transformers.CLIPVisionConfig(**_TOWER),
    text_config=transformers.LlamaConfig(**_TEXT),
    image_token_index=IMAGE_TOKEN,
  )
  return perturbed(transformers.LlavaForConditionalGeneration(config))


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  folder = tmp_path_factory.mktemp("llava")
  hf_llava().save_pretrained(folder)
  return folder, *hf_vision.load_llava(folder)


def prompt(n_image_tokens: int) -> np.ndarray:
  """BOS, some text, the image's tokens, more text."""
  rng = np.random.default_rng(3)
  text = rng.integers(3, 200, size=9)
  return np.concatenate([[1], text[:4], [IMAGE_TOKEN] * n_image_tokens, text[4:]]).astype(np.int64)


def hf_logits(ids, pixels, model=None):
  with torch.no_grad():
    return (model or hf_llava())(
      input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2)
    ).logits.numpy()


def test_logits_match_transformers(imported):
  folder, cfg, _ = imported
  assert (cfg.feature_layer, cfg.feature_select, cfg.image_tokens) == (-2, "patch", 16)
  ids, pixels = prompt(cfg.image_tokens)[None], images(1)
  model = jaxtune.load(folder)
  assert model.llava == cfg
  ours = model.logits(ids, pixels[:, None])
  np.testing.assert_allclose(np.asarray(ours), hf_logits(ids, pixels), atol=1e-4, rtol=0)
  with pytest.raises(GenerationError, match="prompt 0 has 16 image tokens, but its 2 images"):
    model.generate(ids.tolist(), images=[images(2)])


def test_export_loads_in_transformers(imported, tmp_path):
  _, cfg, variables = imported
  hf_vision.save_llava(cfg, variables, tmp_path)
  again = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
  ids, pixels = prompt(cfg.image_tokens)[None], images(1)
  np.testing.assert_allclose(hf_logits(ids, pixels, again), hf_logits(ids, pixels), atol=1e-5)
  cfg_again, variables_again = hf_vision.load_llava(tmp_path)
  assert cfg_again == cfg
  jax.tree.map(np.testing.assert_array_equal, variables_again, variables)


def test_init_matches_the_import_layout(imported):
  _, cfg, variables = imported
  module = llava.model(cfg)
  abstract = nn.meta.unbox(jax.eval_shape(llava.init_fn(module), jax.random.key(0)))
  assert jax.tree.map(jnp.shape, abstract) == jax.tree.map(np.shape, variables)


def test_splice_against_numpy():
  rng = np.random.default_rng(0)
  is_image = rng.random((3, 12)) < 0.4
  x = rng.normal(size=(3, 12, 5)).astype(np.float32)
  features = rng.normal(size=(3, 12, 5)).astype(np.float32)
  expected = x.copy()
  for b in range(3):
    for k, t in enumerate(np.flatnonzero(is_image[b])):
      expected[b, t] = features[b, k]
  np.testing.assert_array_equal(np.asarray(llava.splice(x, is_image, features)), expected)


def test_generate_with_an_image_matches_transformers(imported, tmp_path, monkeypatch, capsys):
  """`jaxtune generate FOLDER --image PATH --prompt TEXT` on the 8-device mesh: the image
  preprocessed as the encoder's size says, its features prefilled into the KV cache once, then
  greedy decoding; the same tokens as transformers' `generate` (both never choosing the ids past
  the tokenizer's vocabulary)."""
  folder, cfg, _ = imported
  Image.fromarray(np.random.default_rng(5).integers(0, 256, (20, 24, 3), np.uint8)).save(
    tmp_path / "x.png"
  )
  tok = CharTokenizer()
  real_load = jaxtune.load
  monkeypatch.setattr(
    jaxtune, "load", lambda path, **kw: real_load(path, **kw | {"tokenizer": tok})
  )
  args = ["generate", str(folder), "--image", str(tmp_path / "x.png"), "--prompt", "hi"]
  args += ["distributed.mode=disabled"]  # JAX has started in this process.
  assert cli.main([*args, "--max-new-tokens", "12"]) == 0
  ours = capsys.readouterr().out.removesuffix("\n")

  model = real_load(folder, tokenizer=tok)
  ids, pixels = model.image_prompt([Message("user", "hi")], [tmp_path / "x.png"])
  assert ids == [1, *[IMAGE_TOKEN] * cfg.image_tokens, 3, *tok.encode("hi")]
  with torch.no_grad():
    out = hf_llava().generate(
      input_ids=torch.tensor([ids]),
      pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2),
      max_new_tokens=12,
      do_sample=False,
      eos_token_id=tok.eos_id,
      pad_token_id=0,
      suppress_tokens=list(range(tok.vocab_size, cfg.text.vocab_size)),  # Past the tokenizer.
    )
  theirs = [t for t in out[0, len(ids) :].tolist()]
  theirs = theirs[: theirs.index(tok.eos_id)] if tok.eos_id in theirs else theirs
  assert len(theirs) >= 4 and ours == tok.decode(theirs)


def test_a_siglip_llava_converts_to_transformers(tmp_path):
  """A SigLIP-tower LLaVA (no class token: every patch a feature, transformers' "full"), loaded
  with `jaxtune.load` and written by `jaxtune convert SRC DST --to hf`: jaxtune's logits and
  those of the written folder in transformers equal the original's within 1e-4."""
  torch.manual_seed(0)
  config = transformers.LlavaConfig(
    vision_config=transformers.SiglipVisionConfig(**_TOWER),
    text_config=transformers.LlamaConfig(**_TEXT),
    image_token_index=IMAGE_TOKEN,
    vision_feature_select_strategy="full",
  )
  original = perturbed(transformers.LlavaForConditionalGeneration(config))
  original.save_pretrained(tmp_path / "hf")
  model = jaxtune.load(tmp_path / "hf")
  assert (model.llava.vision.class_token, model.llava.image_tokens) == (False, 16)
  ids, pixels = prompt(16)[None], images(1)
  expected = hf_logits(ids, pixels, original)
  np.testing.assert_allclose(np.asarray(model.logits(ids, pixels[:, None])), expected, atol=1e-4)
  assert cli.main(["convert", str(tmp_path / "hf"), str(tmp_path / "out"), "--to", "hf"]) == 0
  again = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
  np.testing.assert_allclose(hf_logits(ids, pixels, again), expected, atol=1e-4, rtol=0)
  # The images' preparation travels too: transformers' processor and jaxtune's agree on it.
  assert jaxtune.load(tmp_path / "out").preprocess == model.preprocess
  photo = Image.fromarray(np.random.default_rng(1).integers(0, 255, (20, 30, 3), np.uint8))
  processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "out")
  theirs = processor(photo, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
  np.testing.assert_allclose(model.preprocess(photo), theirs, atol=2e-2)

  config.vision_feature_select_strategy = "default"  # Would drop the first patch.
  (tmp_path / "hf" / "config.json").write_text(config.to_json_string())
  with pytest.raises(CheckpointError, match="config.json: vision_feature_select_strategy"):
    hf_vision.load_llava(tmp_path / "hf")
