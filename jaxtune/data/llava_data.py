"""A LLaVA run's data (`vision.encoder` set): LLaVA JSON read by `multimodal`, tokenized with
`<image>` expanded to the encoder's tokens, and batches that carry each row's images.

The batches are `pipeline.Batches` (rows' streams, packing, resumable state) whose rows also
hold `images` [B, M, Y, X, C]: row b's images in the order of its image tokens, zeros after.
M = data.max_length // image tokens per image, the most a row can hold (image tokens are all
inputs: a conversation ends with its answer).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from jaxtune.config import Config
from jaxtune.data import multimodal, packing, pipeline, templates
from jaxtune.data import tokenizer as tokenizer_lib
from jaxtune.data.images import Preprocess
from jaxtune.errors import ConfigError, DataError
from jaxtune.sharding import BatchRows


@dataclasses.dataclass(frozen=True)
class ImageBatch(packing.Batch):
  images: np.ndarray  # [B, M, Y, X, C]


class ImageBatches(pipeline.Batches):
  """`pipeline.Batches` of `multimodal.ImageExample`s, with their images read."""

  def __init__(self, *args, preprocess: Preprocess, slots: int, **kwargs):
    super().__init__(*args, **kwargs)
    self.preprocess, self.slots = preprocess, slots

  def _make_batch(self, examples, placed) -> ImageBatch:
    arrays = multimodal.make_batch(examples, placed, self.length, self.slots, self.preprocess)
    return ImageBatch(**arrays)


def image_slots(max_length: int, image_tokens: int) -> int:
  """Images a row holds at most (M): image tokens are inputs, of which a row has max_length."""
  return max(max_length // image_tokens, 1)


def preprocess(cfg: Config) -> Preprocess:
  v = cfg.vision
  return Preprocess(
    size=v.image_size,
    resize=v.resize,
    mean=v.mean,
    std=v.std,
    channels=v.channels,
    pad_to_square=v.pad_to_square,
  )


def image_token_id(cfg: Config, tokenizer) -> int:
  """`vision.image_token_id`, or the tokenizer's `<image>` (-1)."""
  if cfg.vision.image_token_id >= 0:
    return cfg.vision.image_token_id
  found = tokenizer.special_id(multimodal.IMAGE)
  if found is None:
    raise ConfigError(
      f"vision.image_token_id=-1, but the tokenizer (data.tokenizer={cfg.data.tokenizer!r}) has "
      f"no {multimodal.IMAGE} token: set vision.image_token_id to a token the text never uses"
    )
  return found


def _tokenizer(cfg: Config, convs: list[multimodal.ImageConversation]):
  d = cfg.data
  specials = templates.TEMPLATES[d.template].special_tokens
  if d.tokenizer:
    tok = pipeline.load_tokenizer(d.tokenizer)
  else:  # Trained on the rendered text, `<image>` a token of its own.
    texts = (templates.to_text(templates.render(c.conversation, d.template), "", "") for c in convs)
    tok = tokenizer_lib.train(texts, d.tokenizer_vocab_size, [*specials, multimodal.IMAGE])
  return tok.with_special_tokens(specials)


def load(cfg: Config, seed: int, rows: BatchRows | None = None) -> pipeline.Data:
  """This process's rows of the LLaVA file `data.path` (the tokenizer trained on all of it)."""
  del seed  # Every record trains; the order is the batches'.
  d, v = cfg.data, cfg.vision
  if not d.path:
    raise ConfigError("vision.encoder is set: data.path must name a LLaVA .json or .jsonl file")
  if d.eval_path or d.eval_size:
    raise ConfigError(
      "a LLaVA run (vision.encoder) holds no data out yet: unset data.eval_path and "
      "data.eval_size (its held-out loss is on the first training batch)"
    )
  convs = multimodal.read(d.path, v.image_folder or None)
  tok = _tokenizer(cfg, convs)
  token = image_token_id(cfg, tok)
  tokens_per_image = v.llava(cfg.model).image_tokens
  stats = multimodal.Stats(records=len(convs))
  train, positions = [], []
  for p, c in enumerate(convs):
    if rows is not None and not rows.keeps(p):
      continue
    ex = multimodal.tokenize(c, d.template, tok, token, tokens_per_image, d.train_on_prompt)
    if (ex := multimodal.fit(ex, d.max_length, d.truncation, stats)) is not None:
      train.append(ex)
      positions.append(p)
  if not train:
    raise DataError(d.path, f"no conversation fits data.max_length={d.max_length}")
  slots = image_slots(d.max_length, tokens_per_image)
  batches = functools.partial(ImageBatches, preprocess=preprocess(cfg), slots=slots)
  none = np.zeros(0, np.int64)
  return pipeline.Data(tok, train, np.asarray(positions), [], none, stats, [], batches)
