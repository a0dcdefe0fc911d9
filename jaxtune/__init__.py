"""jaxtune: instruction fine-tuning of decoder-only language models in JAX/Flax."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
  from jaxtune.api import Model

__version__ = "0.1.0"


def load(path: Any, **options: Any) -> Model:
  """Loads a jaxtune run, a Hugging Face folder or a llama2.c model file: see `jaxtune.api.load`
  (options: mesh, param_dtype, strategy, tokenizer). Imports JAX only when called."""
  from jaxtune import api

  return api.load(path, **options)
