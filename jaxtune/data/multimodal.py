"""Conversations with images (LLaVA's data), tokenized, truncated and packed with their images.

Shape letters: B rows, T length, M image slots per row, Y X pixel rows and columns, C channels.

LLaVA's JSON: `{"image": path (or a list of paths), "conversations": [{"from": "human",
"value": "<image>\\n..."}, {"from": "gpt", "value": ...}, ...]}` (ShareGPT turns), in a .json
array or a .jsonl file. Paths are relative to `image_folder` (default: the data file's folder).
Every `<image>` in a user turn is one of the record's images, in order; the counts must match.

Each `<image>` becomes `image_tokens` copies of `image_token_id` (the encoder's patch tokens),
never supervised, so image tokens get no loss; the model puts the image's features there
(`model/llava.py`). Truncation never cuts an image in half: a conversation whose cut falls inside
an image's tokens is dropped (`Stats.dropped_image_cut`), otherwise its text is cut (and images
after the cut with it; `Stats.truncated`). Packing puts whole conversations, each with its own
images, into rows with their own segment ids, up to `images_per_row` images a row: a batch's
images are [B, M, Y, X, C], a row's in the order of its image tokens, zeros after them.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxtune.data import formats, packing, sources, templates
from jaxtune.data.formats import Conversation
from jaxtune.data.images import Preprocess
from jaxtune.data.packing import Example, TokenizerLike
from jaxtune.data.templates import Chunk
from jaxtune.errors import DataError

IMAGE = "<image>"


@dataclasses.dataclass
class Stats(packing.Stats):
  """`packing.Stats`, and the conversations dropped because the cut fell inside an image."""

  dropped_image_cut: int = 0
  images: int = 0


@dataclasses.dataclass(frozen=True)
class ImageConversation:
  conversation: Conversation
  images: tuple[pathlib.Path, ...]

  @property
  def where(self) -> str:
    return self.conversation.where


@dataclasses.dataclass(frozen=True)
class ImageExample:
  """A tokenized conversation: `example.ids` hold `image_tokens` ids per image, at `spans`."""

  example: Example
  images: tuple[pathlib.Path, ...]
  spans: tuple[tuple[int, int], ...]  # [start, end) of each image's tokens in the ids.
  where: str = ""

  def __len__(self) -> int:
    return len(self.example)

  @property
  def pairs(self) -> int:
    return self.example.pairs

  @property
  def responses(self) -> tuple[ImageExample, ...]:
    """One segment, as `Example`'s (the packer's count of a row's segments)."""
    return (self,)


def parse(record: sources.Record, image_folder: pathlib.Path) -> ImageConversation:
  """One LLaVA record; a DataError naming its file:line if it is malformed, an image is missing
  or the `<image>` count does not match the images."""
  conversation = formats.to_conversation(record, "sharegpt", {})
  paths = record.fields.get("image", [])
  paths = [paths] if isinstance(paths, str) else paths
  if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
    raise DataError(record.where, "field 'image': expected a path or a list of paths")
  if any(IMAGE in m.content for m in conversation.messages if m.role != "user"):
    raise DataError(record.where, f"field 'conversations': {IMAGE} outside a user turn")
  count = sum(m.content.count(IMAGE) for m in conversation.messages)
  if count != len(paths):
    raise DataError(
      record.where,
      f"field 'conversations': {count} {IMAGE} placeholders, but {len(paths)} images in 'image'",
    )
  images = tuple(image_folder / p for p in paths)
  for path in images:
    if not path.is_file():
      raise DataError(record.where, f"field 'image': {str(path)!r}: no such file")
  return ImageConversation(conversation, images)


def read(path: str, image_folder: str | None = None) -> list[ImageConversation]:
  """Every record of a LLaVA .json or .jsonl file."""
  folder = pathlib.Path(image_folder) if image_folder else pathlib.Path(path).parent
  source = sources.open_source(path)
  return [parse(record, folder) for record in source.read(range(len(source)))]


class _ImageTokenizer:
  """A tokenizer whose special token `<image>` is `image_token_id`."""

  def __init__(self, tokenizer: TokenizerLike, image_token_id: int):
    self._tokenizer, self._image = tokenizer, image_token_id

  def __getattr__(self, name: str) -> Any:
    return getattr(self._tokenizer, name)

  def special_id(self, token: str) -> int | None:
    return self._image if token == IMAGE else self._tokenizer.special_id(token)


def _image_chunks(chunks: Sequence[Chunk]) -> list[Chunk]:
  """The chunks with each `<image>` of the conversation's text a special chunk of its own."""
  out: list[Chunk] = []
  for chunk in chunks:
    if not chunk.content or IMAGE not in chunk.text:
      out.append(chunk)
      continue
    for k, text in enumerate(chunk.text.split(IMAGE)):
      if k:
        out.append(Chunk(IMAGE, supervised=False, special=True))
      if text:
        out.append(dataclasses.replace(chunk, text=text))
  return out


def tokenize(
  conversation: ImageConversation,
  template: str,
  tokenizer: TokenizerLike,
  image_token_id: int,
  image_tokens: int,
  train_on_prompt: bool = False,
) -> ImageExample:
  """The conversation rendered by `template`, tokenized, each `<image>` expanded."""
  chunks = _image_chunks(templates.render(conversation.conversation, template))
  tok = _ImageTokenizer(tokenizer, image_token_id)
  ex = packing.tokenize(chunks, tok, train_on_prompt)  # type: ignore[arg-type]
  at = np.flatnonzero(ex.ids == image_token_id)
  if len(at) != len(conversation.images):
    raise DataError(
      conversation.where,
      f"the text itself has the image token id {image_token_id}: choose another image_token_id",
    )
  ids, supervised, spans, start = [], [], [], 0
  for k, i in enumerate(at):
    ids += [ex.ids[start:i], np.full(image_tokens, image_token_id, np.int32)]
    supervised += [ex.supervised[start:i], np.zeros(image_tokens, bool)]
    begin = i + k * (image_tokens - 1)
    spans.append((int(begin), int(begin + image_tokens)))
    start = i + 1
  ids.append(ex.ids[start:])
  supervised.append(ex.supervised[start:])
  example = Example(np.concatenate(ids).astype(np.int32), np.concatenate(supervised))
  return ImageExample(example, conversation.images, tuple(spans), conversation.where)


def prompt_ids(
  conversation: ImageConversation,
  template: str,
  tokenizer: TokenizerLike,
  image_token_id: int,
  image_tokens: int,
) -> list[int]:
  """The tokens a model continues to answer the conversation's last user turn (the
  conversation ends with it, or its last assistant turn is left out)."""
  messages = conversation.conversation.messages
  if messages and messages[-1].role == "assistant":
    messages = messages[:-1]
  head = dataclasses.replace(conversation.conversation, messages=messages)
  ex = tokenize(
    ImageConversation(head, conversation.images), template, tokenizer, image_token_id, image_tokens
  )
  return ex.example.ids.tolist()


def fit(ex: ImageExample, max_length: int, policy: str, stats: Stats) -> ImageExample | None:
  """`packing.fit` that never cuts an image: None if the example is dropped."""
  cut = max_length + 1
  if len(ex) > cut and policy == "truncate":
    if any(start < cut < end for start, end in ex.spans):
      stats.dropped_image_cut += 1
      return None
    kept = [s for s in ex.spans if s[1] <= cut]
    ex = dataclasses.replace(ex, images=ex.images[: len(kept)], spans=tuple(kept))
  fitted = packing.fit(ex.example, max_length, policy, stats)
  if fitted is None:
    return None
  stats.images += len(ex.images)
  return dataclasses.replace(ex, example=fitted)


def assign_rows(
  examples: Sequence[ImageExample], rows: int, length: int, images_per_row: int, pack: bool
) -> list[list[int]]:
  """First fit by both pairs (tokens - 1) and images; stops at the first example that fits
  nowhere (see `packing.assign_rows`)."""
  fill, images = [0] * rows, [0] * rows
  placed: list[list[int]] = [[] for _ in range(rows)]
  for i, ex in enumerate(examples):
    n, m = len(ex) - 1, len(ex.images)
    if m > images_per_row:
      raise DataError(ex.where, f"{m} images, more than images_per_row={images_per_row}")
    row = next(
      (
        r
        for r in range(rows)
        if fill[r] + n <= length and images[r] + m <= images_per_row and (pack or not placed[r])
      ),
      None,
    )
    if row is None:
      break
    placed[row].append(i)
    fill[row] += n
    images[row] += m
  return placed


def make_batch(
  examples: Sequence[ImageExample],
  placed: list[list[int]],
  length: int,
  images_per_row: int,
  preprocess: Preprocess,
) -> dict[str, np.ndarray]:
  """The batch arrays of `packing.make_batch` and `images` [B, M, Y, X, C], each image read and
  preprocessed."""
  batch = packing.make_batch([ex.example for ex in examples], placed, length)
  s = preprocess.size
  images = np.zeros((len(placed), images_per_row, s, s, preprocess.channels), np.float32)
  for r, indices in enumerate(placed):
    paths = [(p, examples[i].where) for i in indices for p in examples[i].images]
    for m, (path, where) in enumerate(paths):
      images[r, m] = preprocess.load(path, where)
  return {**dataclasses.asdict(batch), "images": images}
