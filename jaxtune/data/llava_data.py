"""A LLaVA run's data (`vision.encoder` set): LLaVA JSON read by `multimodal`, tokenized with
`<image>` expanded to the encoder's tokens, and batches that carry each row's images.

The batches are `batches.Batches` (rows' streams, packing, resumable state) whose rows also
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
from jaxtune.data.batches import Batches
from jaxtune.data.images import Preprocess
from jaxtune.errors import ConfigError, DataError
from jaxtune.sharding import BatchRows


@dataclasses.dataclass(frozen=True)
class ImageBatch(packing.Batch):
  images: np.ndarray  # [B, M, Y, X, C]


class ImageBatches(Batches):
  """`Batches` of `multimodal.ImageExample`s, with their images read."""

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


def _examples(convs, cfg: Config, tok, token: int, rows: BatchRows | None, stats):
  """(examples, their source positions) of the conversations of the batch rows `rows`."""
  d = cfg.data
  tokens_per_image = cfg.vision.llava(cfg.model).image_tokens
  examples, positions = [], []
  for p, c in enumerate(convs):
    if rows is not None and not rows.keeps(p):
      continue
    ex = multimodal.tokenize(c, d.template, tok, token, tokens_per_image, d.train_on_prompt)
    if (ex := multimodal.fit(ex, d.max_length, d.truncation, stats)) is not None:
      examples.append(ex)
      positions.append(p)
  return examples, np.asarray(positions, np.int64)


def held_out_prompt(cfg: Config, convs, tok, token: int):
  """`pipeline.Data.prompt` of the held-out `convs`: a prompt's ids, `<image>` expanded, and its
  images read."""
  by_where = {c.where: c for c in convs}
  pre = preprocess(cfg)
  tokens_per_image = cfg.vision.llava(cfg.model).image_tokens

  def prompt(head):
    images = by_where[head.where].images
    ids = multimodal.prompt_ids(
      multimodal.ImageConversation(head, images), cfg.data.template, tok, token, tokens_per_image
    )
    pixels = [pre.load(path, head.where) for path in images]
    return ids, np.stack(pixels) if pixels else np.zeros((0, pre.size, pre.size, pre.channels))

  return prompt


def load(cfg: Config, seed: int, rows: BatchRows | None = None) -> pipeline.Data:
  """This process's rows of the LLaVA file `data.path` (the tokenizer trained on all of it) and
  of the held-out one `data.eval_path`."""
  del seed  # Every record trains; the order is the batches'.
  d, v = cfg.data, cfg.vision
  if not d.path:
    raise ConfigError("vision.encoder is set: data.path must name a LLaVA .json or .jsonl file")
  if d.eval_size:
    raise ConfigError(
      f"data.eval_size={d.eval_size}: a LLaVA run (vision.encoder) holds out a file of its own, "
      "data.eval_path, not records of data.path"
    )
  convs = multimodal.read(d.path, v.image_folder or None)
  held = multimodal.read(d.eval_path, v.image_folder or None) if d.eval_path else []
  tok = _tokenizer(cfg, convs)
  token = image_token_id(cfg, tok)
  stats = multimodal.Stats(records=len(convs))
  train, positions = _examples(convs, cfg, tok, token, rows, stats)
  if not train:
    raise DataError(d.path, f"no conversation fits data.max_length={d.max_length}")
  evals, eval_positions = _examples(held, cfg, tok, token, rows, multimodal.Stats())
  if held and not evals and rows is None:
    raise DataError(d.eval_path, f"no conversation fits data.max_length={d.max_length}")
  slots = image_slots(d.max_length, v.llava(cfg.model).image_tokens)
  batches = functools.partial(ImageBatches, preprocess=preprocess(cfg), slots=slots)
  return pipeline.Data(
    tok,
    train,
    positions,
    evals,
    eval_positions,
    stats,
    [c.conversation for c in held],
    batches,
    held_out_prompt(cfg, held, tok, token),
  )
