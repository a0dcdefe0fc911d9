"""`jaxtune data inspect`: rendered examples with their supervised spans marked (preference data:
each prompt's responses, best first, with their ranks), and statistics."""

from __future__ import annotations

from jaxtune.config import Config
from jaxtune.data import pipeline
from jaxtune.data.packing import Example, Group
from jaxtune.data.tokenizer import Tokenizer

OPEN, CLOSE = "\u27e6", "\u27e7"  # ⟦ supervised ⟧


def marked(tok: Tokenizer, example: Example) -> str:
  """The example's text with every supervised span (as the loss mask has it) inside ⟦ ⟧."""
  ids, supervised = example.ids.tolist(), example.supervised.tolist()
  out, start = [], 0
  prefix = ""
  for k in range(1, len(ids) + 1):
    if k == len(ids) or supervised[k] != supervised[start]:
      text = tok.decode(ids[:k], show_special=True)
      span, prefix = text[len(prefix) :], text
      out.append(f"{OPEN}{span}{CLOSE}" if supervised[start] else span)
      start = k
  return "".join(out)


def _shown(tok: Tokenizer, item: Example | Group, number: int) -> list[str]:
  if isinstance(item, Example):
    return [f"=== example {number} ({len(item)} tokens) ===", marked(tok, item), ""]
  k = len(item.responses)
  lines = [f"=== {'pair' if k == 2 else 'ranking'} {number} ({k} responses, best first) ==="]
  for rank, response in sorted(zip(item.ranks, item.responses, strict=True), key=lambda p: p[0]):
    label = ("chosen", "rejected")[rank] if k == 2 else f"rank {rank}"
    lines += [f"--- {label} ({len(response)} tokens) ---", marked(tok, response)]
  return [*lines, ""]


def _preference_rows(train: list[Example | Group]) -> list[tuple[str, str]]:
  groups = [g for g in train if isinstance(g, Group)]
  if not groups:
    return []
  sizes = sorted({len(g.responses) for g in groups})
  return [("preferences", f"{len(groups)} prompts with {sizes} responses each (one segment each)")]


def report(cfg: Config, num_examples: int = 3) -> str:
  data = pipeline.load(cfg.data, cfg.train.seed)
  tok, stats = data.tokenizer, data.stats
  lines = []
  for i, example in enumerate(data.train[:num_examples]):
    lines += _shown(tok, example, i + 1)
  epoch = pipeline.training_batches(data, cfg).batches_per_epoch()
  rows = [
    ("source", cfg.data.path or "embedded synthetic mixture"),
    ("template", cfg.data.template),
    (
      "tokenizer",
      f"{cfg.data.tokenizer or 'trained on the data'} ({tok.vocab_size} tokens, "
      f"added {list(tok.added) or 'none'})",
    ),
    ("records", stats.records),
    ("skipped", f"{stats.skipped} {stats.skipped_reasons or ''}".strip()),
    ("examples", f"{stats.examples} train, {len(data.eval)} held out"),
    *_preference_rows(data.train),
    (
      "tokens",
      f"{stats.tokens} (mean {stats.tokens / max(stats.examples, 1):.1f}, max {stats.max_tokens})",
    ),
    ("supervised", f"{stats.supervised_tokens} ({100 * stats.supervised_fraction:.1f}% of tokens)"),
    (
      "truncated",
      f"{stats.truncated} (policy {cfg.data.truncation}, max_length {cfg.data.max_length})",
    ),
    (
      "dropped",
      f"{stats.dropped_too_long} too long, {stats.dropped_unsupervised} with nothing supervised",
    ),
    (
      "packing",
      f"{epoch.batches} batches of {cfg.train.batch_size} x {cfg.data.max_length} per epoch, "
      f"{100 * epoch.efficiency:.1f}% of slots used ({'packed' if cfg.data.pack else 'unpacked'})",
    ),
  ]
  lines.append("=== statistics ===")
  lines += [f"{name:<12} {value}" for name, value in rows]
  return "\n".join(lines)
