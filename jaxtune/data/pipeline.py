"""From `DataConfig` to batches: source -> conversations -> template -> tokens -> packed rows.

Each row of the global batch is its own stream of the data: row r of a batch of B rows is packed
from the examples at source positions p with p % B = r alone, shuffled by (seed, row, epoch). So a
batch is a function of the seed, the step and the data, never of the mesh: the mesh only decides
which process builds which rows (`sharding.batch_rows`). `load` reads and tokenizes only the
records of this process's rows (with statistics); `Batches` iterates over them deterministically,
with a state (the batch count) that can be saved and restored so that a resumed run, on any mesh
and any number of processes, sees exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from jaxtune.config import Config, DataConfig
from jaxtune.data import formats, hf_tokenizer, mixtures, packing, preference, synthetic, templates
from jaxtune.data import llama2c_tokenizer as llama2c
from jaxtune.data import tokenizer as tokenizer_lib
from jaxtune.data.batches import Batches
from jaxtune.data.formats import Conversation
from jaxtune.data.packing import Example, Group, Stats
from jaxtune.data.preference import Preference
from jaxtune.data.sources import BadRecords, Record, Source, open_source
from jaxtune.errors import DataError
from jaxtune.sharding import BatchRows

log = logging.getLogger(__name__)

Tokenizer = tokenizer_lib.Tokenizer | llama2c.Tokenizer | hf_tokenizer.HFTokenizer


@dataclasses.dataclass
class Data:
  """A process's data. Every example keeps its position in its source (`positions`,
  `eval_positions`), which names the row of the global batch that trains on it
  (`BatchRows.keeps`)."""

  tokenizer: Tokenizer
  train: list[Example | Group]
  positions: np.ndarray
  eval: list[Example | Group]
  eval_positions: np.ndarray
  stats: Stats  # Of this process's rows' training records.
  held_out: list[Conversation]  # All of them (a preference's best), on every process.
  # The batch iterator's class and options (`Batches`; a LLaVA run's `llava_data.ImageBatches`).
  batches: Callable[..., Batches] | None = None
  # A held-out conversation's prompt (its last answer left out) as (ids, images [M, Y, X, C] or
  # None); None: the text's (`packing.prompt_ids`). A LLaVA run's expands and reads its images.
  prompt: Callable[[Conversation], tuple[list[int], np.ndarray | None]] | None = None


@dataclasses.dataclass
class Conversations:
  """Conversations, or preferences (a prompt's ranked responses: `data/preference.py`)."""

  train: list[Conversation | Preference]
  positions: list[int]  # Each training conversation's position in its source.
  held_out: list[Conversation | Preference]

  def sharded(self, rows: BatchRows | None) -> Conversations:
    """The training conversations of the batch rows `rows` (None: all)."""
    if rows is None:
      return self
    kept = [(c, p) for c, p in zip(self.train, self.positions, strict=True) if rows.keeps(p)]
    return Conversations([c for c, _ in kept], [p for _, p in kept], self.held_out)


def _source(path: str, cfg: DataConfig) -> Source:
  if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "dataset_info.json")):
    raise DataError(
      path,
      "the folder is neither a TFDS dataset nor Flan CoT .tsv files (a TFDS dataset has a "
      "dataset_info.json; see jaxtune.data.tfds)",
    )
  if os.path.isdir(path):
    from jaxtune.data import tfds  # TFDS-prepared datasets; imported only when used.

    records = tfds.load(path)
    return Source(path, range(len(records)), lambda i: Record(records[i], f"{path}[{i}]"))
  return open_source(path, cfg.tsv_columns.split(","))


def _convert(record: Record, cfg: DataConfig, names: dict[str, str]) -> Conversation | Preference:
  fmt = cfg.format
  if fmt == "auto":
    fmt = preference.detect(record, names) or formats.detect(record, names)
  if fmt in preference.FORMATS:
    return preference.to_preference(record, fmt, names, cfg.system_prompt)
  return formats.to_conversation(record, fmt, names, cfg.system_prompt)


def _conversations(
  source: Source, positions: Sequence[int], cfg: DataConfig, stats: Stats
) -> tuple[list[Conversation | Preference], list[int]]:
  """The conversations of the records at `positions` that are well-formed (all must be, unless
  `data.on_bad_record=skip`), with their positions."""
  bad = BadRecords() if cfg.on_bad_record == "skip" else None
  names = formats.parse_field_map(cfg.fields)
  out, kept = [], []
  for i in positions:
    try:
      for record in source.read([i]):
        out.append(_convert(record, cfg, names))
        kept.append(i)
    except DataError as e:
      if bad is None:
        raise
      bad.add(e)
  stats.records += len(positions)  # Unreadable ones count as records.
  _count_skipped(bad, stats, source.path)
  return out, kept


def _count_skipped(bad: BadRecords | None, stats: Stats, where: str) -> None:
  if bad is not None and bad.count:
    stats.skipped += bad.count
    for reason, n in bad.reasons.items():
      stats.skipped_reasons[reason] = stats.skipped_reasons.get(reason, 0) + n
    log.warning("%s: skipped %d bad records: %s", where, bad.count, bad.reasons)


def _is_flan_folder(path: str) -> bool:
  return os.path.isdir(path) and any(f.endswith(".tsv") for f in os.listdir(path))


def conversations(
  cfg: DataConfig, seed: int, stats: Stats, rows: BatchRows | None = None
) -> Conversations:
  """The training conversations of the configured source that train in the batch rows `rows`
  (None: all; a data file is read only there), and all of its held-out ones."""
  if not cfg.path or _is_flan_folder(cfg.path):  # Mixtures: made whole, then sharded.
    if not cfg.path:
      tasks = synthetic.tasks(seed, cfg.synthetic_examples)
      held_out_tasks = synthetic.tasks(seed + 1, max(cfg.synthetic_examples // 20, 8))
      held_out = mixtures.mix(held_out_tasks, seed, cfg.mixture_cap, 0, held_out=True)
    else:
      tasks, held_out = mixtures.flan_cot_tasks(cfg.path), []
    stats.records = sum(len(t.records) for t in tasks)
    if cfg.format == "pairwise":  # Each prompt's answer against another record's.
      train = mixtures.preference_pairs(tasks, seed, cfg.mixture_cap)
      if not cfg.path:
        held_out = mixtures.preference_pairs(held_out_tasks, seed, cfg.mixture_cap, held_out=True)
    else:
      train = mixtures.mix(tasks, seed, cfg.mixture_cap, cfg.few_shot)
    return Conversations(train, list(range(len(train))), held_out).sharded(rows)
  source = _source(cfg.path, cfg)
  held: set[int] = set()
  if cfg.eval_size:
    if cfg.eval_size >= len(source):
      raise DataError(cfg.path, f"data.eval_size={cfg.eval_size} leaves no training records")
    held = set(np.random.default_rng(seed).permutation(len(source))[: cfg.eval_size].tolist())
  positions = [i for i in range(len(source)) if i not in held and (not rows or rows.keeps(i))]
  train, positions = _conversations(source, positions, cfg, stats)
  if cfg.eval_path:
    eval_source = _source(cfg.eval_path, cfg)
    held_out, _ = _conversations(eval_source, range(len(eval_source)), cfg, Stats())
  else:
    held_out, _ = _conversations(source, sorted(held), cfg, Stats())
  return Conversations(train, positions, held_out)


def load_tokenizer(path: str) -> Tokenizer:
  """A saved tokenizer: a llama2.c `.bin` (stories260K's tok512.bin), a SentencePiece `.model`,
  a Hugging Face `tokenizer.json`, or a folder holding one (as a run's `tokenizer/` does; a
  SentencePiece model first)."""
  if os.path.isdir(path):
    saved = {name: os.path.join(path, name) for name in os.listdir(path)}
    if llama2c.TOKENIZER_FILE in saved:
      return llama2c.Tokenizer.load(saved[llama2c.TOKENIZER_FILE])
    if hf_tokenizer.TOKENIZER_JSON in saved and tokenizer_lib.MODEL_FILE not in saved:
      return hf_tokenizer.HFTokenizer.load(path)
  elif path.endswith(".bin"):
    return llama2c.Tokenizer.load(path)
  elif path.endswith(".json"):
    return hf_tokenizer.HFTokenizer.load(path)
  return tokenizer_lib.Tokenizer.load(path)


def _flat(convs: Sequence[Conversation | Preference]) -> Iterator[Conversation]:
  for c in convs:
    yield from c.conversations if isinstance(c, Preference) else (c,)


def make_tokenizer(cfg: DataConfig, train: Sequence[Conversation | Preference]) -> Tokenizer:
  specials = templates.TEMPLATES[cfg.template].special_tokens
  if cfg.tokenizer:
    tok = load_tokenizer(cfg.tokenizer)
  else:  # Trained on the rendered training text, so template words become pieces.
    texts = (templates.to_text(templates.render(c, cfg.template), "", "") for c in _flat(train))
    tok = tokenizer_lib.train(texts, cfg.tokenizer_vocab_size, specials)
  return tok.with_special_tokens(specials)


def _example(
  c: Conversation | Preference, cfg: DataConfig, tok: Tokenizer, stats: Stats
) -> Example | Group | None:
  if isinstance(c, Preference):
    return preference.tokenize(
      c, cfg.template, tok, cfg.train_on_prompt, cfg.max_length, cfg.truncation, stats
    )
  ex = packing.tokenize(templates.render(c, cfg.template), tok, cfg.train_on_prompt)
  return packing.fit(ex, cfg.max_length, cfg.truncation, stats)


def examples(
  convs: Sequence[Conversation | Preference], cfg: DataConfig, tok: Tokenizer, stats: Stats
) -> list[Example | Group]:
  """The conversations rendered, tokenized and fitted to `data.max_length` (see `packing.fit`);
  preferences as groups (`preference.tokenize`)."""
  return [ex for ex, _ in _fitted(convs, range(len(convs)), cfg, tok, stats)]


def _fitted(convs, positions: Sequence[int], cfg: DataConfig, tok, stats: Stats) -> list:
  """(example or group, position) of each conversation that is kept; a bad one (a preference's
  response truncated to nothing) raises, or is counted and skipped under `on_bad_record=skip`."""
  bad = BadRecords() if cfg.on_bad_record == "skip" else None
  out = []
  for c, p in zip(convs, positions, strict=True):
    try:
      if (ex := _example(c, cfg, tok, stats)) is not None:
        out.append((ex, p))
    except DataError as e:
      if bad is None:
        raise
      bad.add(e)
  _count_skipped(bad, stats, cfg.path)
  return out


def _positioned_examples(
  convs: Sequence[Conversation | Preference],
  positions: Sequence[int],
  cfg: DataConfig,
  tok,
  stats: Stats,
) -> tuple[list[Example | Group], np.ndarray]:
  pairs = _fitted(convs, positions, cfg, tok, stats)
  return [ex for ex, _ in pairs], np.asarray([p for _, p in pairs], np.int64)


def load(cfg: DataConfig, seed: int, rows: BatchRows | None = None) -> Data:
  """This process's data: the training and held-out examples of the batch rows `rows`
  (`sharding.batch_rows`; None: all), tokenized. Training a tokenizer (no `data.tokenizer`)
  reads every record, on every process, since the tokenizer is trained on all of them."""
  stats = Stats()
  train_tokenizer = not cfg.tokenizer
  convs = conversations(cfg, seed, stats, None if train_tokenizer else rows)
  if train_tokenizer and not convs.train:  # Every record read: none is usable.
    raise DataError(
      cfg.path or "embedded data",
      f"no usable record: {stats.skipped} of {stats.records} skipped "
      f"({', '.join(stats.skipped_reasons) or 'all held out'})",
    )
  tok = make_tokenizer(cfg, convs.train)
  if train_tokenizer:  # Read whole for the tokenizer; this process keeps its rows' records.
    convs = convs.sharded(rows)
  train, positions = _positioned_examples(convs.train, convs.positions, cfg, tok, stats)
  if not train:
    raise DataError(
      cfg.path or "embedded data",
      f"no training example is left{f' in {rows}' if rows else ''}: "
      f"{stats.dropped_too_long} too long and {stats.dropped_unsupervised} with nothing "
      f"supervised within data.max_length={cfg.max_length}",
    )
  held = [(c, i) for i, c in enumerate(convs.held_out) if not rows or rows.keeps(i)]
  evals, eval_positions = _positioned_examples(
    [c for c, _ in held], [i for _, i in held], cfg, tok, Stats()
  )
  # Shown answered after training: a preference's prompt with its best response.
  shown = [c.best if isinstance(c, Preference) else c for c in convs.held_out]
  return Data(tok, train, positions, evals, eval_positions, stats, shown)


def training_batches(data: Data, cfg: Config, rows: BatchRows | None = None) -> Batches:
  """The training iterator as `cfg` (data and train sections) configures it; this process builds
  the rows `rows` (None: all)."""
  return (data.batches or Batches)(
    data.train,
    cfg.train.batch_size,
    cfg.data.max_length,
    pack=cfg.data.pack,
    seed=cfg.train.seed,
    shuffle=cfg.data.shuffle,
    positions=data.positions,
    rows=rows,
    max_segments=cfg.data.max_segments,
  )


def max_segments(data: Data, cfg: DataConfig) -> int:
  """A static bound on the segments of a packed row of this process's data (`data.max_segments`,
  else as many of its shortest response as fit in `data.max_length`, at most all of them): the
  preference objectives' pair matrices are this big (`train/preference.py`)."""
  if cfg.max_segments:
    return cfg.max_segments
  items = (*data.train, *data.eval)
  if not cfg.pack:
    return max(len(item.responses) for item in items)
  responses = [r for item in items for r in item.responses]
  return min(cfg.max_length // min(r.pairs for r in responses), len(responses))
