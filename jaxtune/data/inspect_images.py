"""`jaxtune data inspect --image-tokens S`: LLaVA data as the model will see it, each image's S
token slots shown as one `⟨image k: file, S tokens⟩` mark, with the statistics of images,
truncation around them and packing (rows with their images)."""

from __future__ import annotations

import pathlib

from jaxtune.config import Config
from jaxtune.data import inspect, llava_data, multimodal, pipeline
from jaxtune.data.packing import Example
from jaxtune.errors import ConfigError


def marked(tok, ex: multimodal.ImageExample) -> str:
  """`inspect.marked` of the text between images, each image's slots one mark."""
  ids, supervised = ex.example.ids, ex.example.supervised
  out, start = [], 0
  for k, ((begin, end), path) in enumerate(zip(ex.spans, ex.images, strict=True), 1):
    out.append(inspect.marked(tok, Example(ids[start:begin], supervised[start:begin])))
    out.append(f"\u27e8image {k}: {pathlib.Path(path).name}, {end - begin} tokens\u27e9")
    start = end
  out.append(inspect.marked(tok, Example(ids[start:], supervised[start:])))
  return "".join(out)


def report(cfg: Config, image_tokens: int, num_examples: int = 3) -> str:
  if not cfg.data.path:
    raise ConfigError("data inspect --image-tokens: set data.path to a LLaVA .json or .jsonl file")
  convs = multimodal.read(cfg.data.path)
  tok = pipeline.make_tokenizer(cfg.data, [c.conversation for c in convs])
  tok = tok.with_special_tokens([multimodal.IMAGE])
  image_id = tok.special_id(multimodal.IMAGE)
  stats = multimodal.Stats(records=len(convs))
  examples = []
  for c in convs:
    ex = multimodal.tokenize(c, cfg.data.template, tok, image_id, image_tokens)
    ex = multimodal.fit(ex, cfg.data.max_length, cfg.data.truncation, stats)
    if ex is not None:
      examples.append(ex)
  lines = []
  for i, ex in enumerate(examples[:num_examples]):
    lines += [f"=== example {i + 1} ({len(ex)} tokens) ===", marked(tok, ex), ""]
  rows, batches, pending = cfg.train.batch_size, 0, list(examples)
  per_row = llava_data.image_slots(cfg.data.max_length, image_tokens)  # As training's rows.
  used_slots = 0
  while pending:
    placed = multimodal.assign_rows(pending, rows, cfg.data.max_length, per_row, cfg.data.pack)
    taken = {i for row in placed for i in row}
    used_slots += sum(len(pending[i]) - 1 for i in taken)
    pending = [ex for i, ex in enumerate(pending) if i not in taken]
    batches += 1
  slots = batches * rows * cfg.data.max_length
  table = [
    ("source", cfg.data.path),
    ("template", cfg.data.template),
    ("tokenizer", f"{tok.vocab_size} tokens, image token id {image_id}"),
    ("records", stats.records),
    ("examples", stats.examples),
    ("images", f"{stats.images} ({image_tokens} tokens each, never supervised)"),
    ("tokens", f"{stats.tokens} (max {stats.max_tokens})"),
    ("supervised", f"{stats.supervised_tokens} ({100 * stats.supervised_fraction:.1f}%)"),
    ("truncated", f"{stats.truncated} (text cut, policy {cfg.data.truncation})"),
    (
      "dropped",
      f"{stats.dropped_image_cut} cut inside an image, {stats.dropped_too_long} too long, "
      f"{stats.dropped_unsupervised} with nothing supervised",
    ),
    (
      "packing",
      f"{batches} batches of {rows} x {cfg.data.max_length} (up to {per_row} images a "
      f"row), {100 * used_slots / max(slots, 1):.1f}% of slots used",
    ),
  ]
  lines.append("=== statistics ===")
  lines += [f"{name:<12} {value}" for name, value in table]
  return "\n".join(lines)
