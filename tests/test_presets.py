"""Full-size presets: parameter counts from `jax.eval_shape` (no memory) equal published figures."""

import jax
import pytest

from jaxtune.config_model import ModelConfig
from jaxtune.model import presets, transformer
from jaxtune.peft import partition

# Published counts: Hugging Face model cards / config parameter totals, and the PaLM paper's
# Table 1 (8.63B, given to three figures).
PUBLISHED = {
  "llama2-7b": 6_738_415_616,
  "llama3-8b": 8_030_261_248,
  "mistral-7b": 7_241_732_096,
  "gemma-2b": 2_506_172_416,
  "gpt2": 124_439_808,
  "stories260K": 260_032,  # The 264,128 floats of the file, less the unused RoPE tables (4,096).
}


def _count(name):
  model = transformer.Transformer(ModelConfig(**presets.PRESETS[name]))
  return partition.count(jax.eval_shape(transformer.init_fn(model), jax.random.key(0)))


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_matches_publication(name):
  assert _count(name) == PUBLISHED[name]


def test_palm_8b_matches_the_paper_to_three_figures():
  assert round(_count("palm-8b") / 1e9, 2) == 8.63


def test_every_preset_is_a_valid_config():
  for name, kwargs in presets.PRESETS.items():
    ModelConfig(preset=name, **kwargs).validate()
