"""`jaxtune.load`: any checkpoint jaxtune reads, as one handle to run the model.

Shape letters: B batch, T length, V vocab.

Reading the formats (a jaxtune run, a Hugging Face folder, a llama2.c file) and scoring with a
reward model's head are `train/loading.py`'s; `Model` adds generation with the KV cache, logits,
and a LLaVA model's images.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune import generate, sharding
from jaxtune.data import multimodal
from jaxtune.data.formats import Conversation, Message
from jaxtune.errors import CheckpointError, GenerationError
from jaxtune.train import loading

Tokenizer = loading.Tokenizer
detect = loading.detect


@dataclasses.dataclass(frozen=True, eq=False)
class Model(loading.Loaded):
  """A loaded model (`train/loading.py`'s `Loaded`) that generates."""

  def _check_images(self, prompts: Sequence[Sequence[int]], images: Sequence[Any]) -> None:
    """Each prompt has the image tokens of its images."""
    if self.llava is None:
      raise CheckpointError("this model reads no images (not a LLaVA model)")
    if len(images) != len(prompts):
      raise GenerationError(f"{len(prompts)} prompts but {len(images)} lists of images")
    for i, (prompt, pixels) in enumerate(zip(prompts, images, strict=True)):
      slots = sum(t == self.llava.image_token_id for t in prompt)
      if slots != len(pixels) * self.llava.image_tokens:
        raise GenerationError(
          f"prompt {i} has {slots} image tokens, but its {len(pixels)} images take "
          f"{len(pixels) * self.llava.image_tokens} (see Model.image_prompt)"
        )

  def image_prompt(
    self, messages: Sequence[Message], images: Sequence[str | pathlib.Path]
  ) -> tuple[list[int], np.ndarray]:
    """(token ids, images [M, Y, X, C]) of a conversation about `images`, to continue with
    `generate(..., images=...)`: the template's prompt for the next assistant turn, each
    `<image>` of the user turns expanded (placed before the first user turn's text where the
    turns have none)."""
    if self.llava is None or self.preprocess is None:
      raise CheckpointError("this model reads no images (not a LLaVA model)")
    messages = list(messages)
    if images and not any(multimodal.IMAGE in m.content for m in messages):
      first = next(i for i, m in enumerate(messages) if m.role == "user")
      marks = "".join(f"{multimodal.IMAGE}\n" for _ in images)
      messages[first] = dataclasses.replace(
        messages[first], content=marks + messages[first].content
      )
    conversation = multimodal.ImageConversation(
      Conversation(tuple(messages), "prompt"), tuple(pathlib.Path(p) for p in images)
    )
    ids = multimodal.prompt_ids(
      conversation,
      self.template,
      self.tokenizer,
      self.llava.image_token_id,
      self.llava.image_tokens,
    )
    pixels = [self.preprocess.load(p, str(p)) for p in images]
    return ids, np.stack(pixels) if pixels else np.zeros((0, 1, 1, 1), np.float32)

  @functools.cached_property
  def _logits(self) -> Callable[..., jax.Array]:
    return jax.jit(
      lambda params, tokens_bt, **images: self.module.apply({"params": params}, tokens_bt, **images)
    )

  def logits(self, tokens_bt: Any, images: Any = None) -> jax.Array:
    """Float32 logits [B, T, V] of token ids [B, T] (one sequence per row, from position 0);
    `images` [B, M, Y, X, C] (a LLaVA model) in place of each row's image tokens."""
    tokens_bt = jnp.asarray(tokens_bt, jnp.int32)
    if tokens_bt.ndim != 2:
      raise ValueError(f"tokens must be [batch, length], got shape {tokens_bt.shape}")
    extra = {} if images is None else {"images": jnp.asarray(images, jnp.float32)}
    with sharding.use(self.mesh, self.rules or ()):
      return self._logits(self.params, tokens_bt, **extra)

  def generate(
    self,
    prompts: Sequence[Sequence[int]],
    sampling: generate.Sampling | None = None,
    *,
    stop_ids: Sequence[int] | None = None,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = False,
    images: Sequence[np.ndarray] | None = None,
  ) -> list[generate.Completion]:
    """Completions of token-id `prompts` with the KV cache, on the model's mesh (see
    `jaxtune.generate`; sampling None: greedy, up to 256 tokens). `stop_ids` None: EOS and the
    template's end-of-turn tokens; ids past the tokenizer's vocabulary are never chosen.
    `images` (a LLaVA model): each prompt's images [M, Y, X, C] (see `image_prompt`), prefilled
    into the KV cache once."""
    if images is not None:
      self._check_images(prompts, images)
    has_tokenizer = self.tokenizer is not None
    if stop_ids is None:
      stop_ids = generate.template_stop_ids(self.tokenizer, self.template) if has_tokenizer else ()
    return generate.generate(
      self.module,
      self.params,
      prompts,
      sampling or generate.Sampling(),
      stop_ids=stop_ids,
      seed=seed,
      batch_size=batch_size,
      mesh=self.mesh,
      rules=self.rules,
      progress=progress,
      images=images,
      vocab_size=self.tokenizer.vocab_size if has_tokenizer else 0,
    )


def load(
  path: str | pathlib.Path,
  *,
  mesh: jax.sharding.Mesh | None = None,
  param_dtype: str | None = None,
  strategy: str | None = None,
  tokenizer: str | Tokenizer | None = None,
) -> Model:
  """Loads the checkpoint at `path` (any format `detect` knows), as `train/loading.py`'s `load`
  does (`mesh`, `param_dtype`, `strategy` and `tokenizer` are explained there)."""
  loaded = loading.load(
    path, mesh=mesh, param_dtype=param_dtype, strategy=strategy, tokenizer=tokenizer
  )
  return Model(**{f.name: getattr(loaded, f.name) for f in dataclasses.fields(loaded)})
