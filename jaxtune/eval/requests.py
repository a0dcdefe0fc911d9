"""lm-evaluation-harness's three request types, as pure functions of a loaded model and a list of
requests, batched and sharded on the model's mesh:

- `loglikelihood`: (context, continuation) -> (log p(continuation | context), is_greedy);
- `loglikelihood_rolling`: text -> its total log-likelihood, in disjoint windows of the model's
  length (each token predicted once, from as many tokens before it as fit);
- `generate_until`: (context, stop strings, max new tokens) -> greedy text, cut at the first stop
  string (jaxtune's KV-cache engine, `jaxtune.generate`).

Text is tokenized as the harness tokenizes it for a Llama-style Hugging Face tokenizer: a text is
BOS, then its ids with the leading dummy-prefix space (`encode_text`). A pair is encoded whole
and split after the context's ids (`encode_pair`), with the context's trailing spaces moved to
the continuation, so a continuation that merges with the context's last characters gets the ids
it has in the whole text. An empty context is BOS alone.

`model` is the handle `jaxtune.load` returns (`.module`, `.params`, `.tokenizer`, `.mesh`,
`.rules`, `.config`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxtune import generate
from jaxtune.errors import GenerationError
from jaxtune.eval import scoring


def encode_text(tokenizer: Any, text: str) -> list[int]:
  """BOS, then `text`'s ids (as a Hugging Face Llama tokenizer with special tokens encodes it)."""
  return [tokenizer.bos_id, *(tokenizer.encode(text, first=True) if text else [])]


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """(context ids, continuation ids), split from the ids of the whole text."""
  if not context:
    ids = tokenizer.encode(continuation, first=True)
    return ([tokenizer.bos_id], ids) if ids[:1] != [tokenizer.bos_id] else (ids[:1], ids[1:])
  spaces = len(context) - len(context.rstrip())
  if spaces:
    context, continuation = context[:-spaces], context[-spaces:] + continuation
  whole = encode_text(tokenizer, context + continuation)
  split = len(encode_text(tokenizer, context))
  return whole[:split], whole[split:]


def loglikelihood(
  model: Any,
  requests: Sequence[tuple[str, str]],
  batch_size: int = 8,
  pack: bool = True,
) -> list[tuple[float, bool]]:
  """(log p(continuation | context), whether it is the greedy continuation) per request."""
  pairs = [encode_pair(model.tokenizer, c, x) for c, x in requests]
  scores = scoring.score(model, pairs, batch_size, pack)
  return list(zip(scores.logprob.tolist(), scores.greedy.tolist(), strict=True))


def rolling_windows(
  ids: Sequence[int], prefix_id: int, max_seq_len: int, context_len: int = 1
) -> list[tuple[list[int], list[int]]]:
  """(context, continuation) windows that predict every one of `ids` once: the first predicts
  the first `max_seq_len` after `prefix_id`, each next one up to `max_seq_len - context_len + 1`
  more, after the tokens before them that fit (at least `context_len`). The harness's
  `get_rolling_token_windows` and `make_disjoint_window` give the same windows."""
  if not 1 <= context_len <= max_seq_len:
    raise ValueError(f"context_len={context_len} must be in [1, {max_seq_len}]")
  padded = [prefix_id, *ids]  # padded[i] comes just before ids[i].
  windows, start = [], 0
  while start < len(ids):
    end = min(start + (max_seq_len if start == 0 else max_seq_len - context_len + 1), len(ids))
    windows.append((padded[max(0, end - max_seq_len) : start + 1], list(ids[start:end])))
    start = end
  return windows


def loglikelihood_rolling_ids(
  model: Any,
  documents: Sequence[Sequence[int]],
  batch_size: int = 8,
  pack: bool = True,
) -> np.ndarray:
  """The total log-likelihood of each document's ids ([n] float64), after BOS."""
  max_seq_len = model.module.config.max_seq_len
  windows = [rolling_windows(d, model.tokenizer.bos_id, max_seq_len) for d in documents]
  logprob = scoring.score(model, [w for ws in windows for w in ws], batch_size, pack).logprob
  bounds = np.cumsum([0, *map(len, windows)])
  return np.asarray([logprob[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:], strict=True)])


def loglikelihood_rolling(
  model: Any, texts: Sequence[str], batch_size: int = 8, pack: bool = True
) -> list[float]:
  """The total log-likelihood of each text (its ids as `encode_text` gives them, BOS included,
  as the harness scores them)."""
  documents = [encode_text(model.tokenizer, t) for t in texts]
  return loglikelihood_rolling_ids(model, documents, batch_size, pack).tolist()


@dataclasses.dataclass(frozen=True)
class Until:
  """A `generate_until` request: greedy from `context` until a stop string, EOS or
  `max_new_tokens`."""

  context: str
  stop: tuple[str, ...] = ()
  max_new_tokens: int = 256


def generate_until(
  model: Any,
  requests: Sequence[Until],
  batch_size: int = 8,
  sampling: generate.Sampling | None = None,
) -> list[str]:
  """The text generated for each request, cut at its first stop string. A context keeps its
  last `max_seq_len - max_new_tokens` ids, as the harness truncates it."""
  out: list[str] = [""] * len(requests)
  max_seq_len = model.module.config.max_seq_len
  groups: dict[int, list[int]] = {}
  for i, r in enumerate(requests):
    groups.setdefault(r.max_new_tokens, []).append(i)
  for max_new, indices in groups.items():
    room = max_seq_len - max_new
    if room <= 0:
      raise GenerationError(
        f"max_new_tokens={max_new} leaves no room for a context in {max_seq_len} positions"
      )
    prompts = [encode_text(model.tokenizer, requests[i].context)[-room:] for i in indices]
    chosen = dataclasses.replace(sampling or generate.Sampling(), max_new_tokens=max_new)
    completions = generate.generate(
      model.module,
      model.params,
      prompts,
      chosen,
      stop_ids=(model.tokenizer.eos_id,),
      batch_size=batch_size,
      mesh=model.mesh,
      rules=model.rules,
      vocab_size=model.tokenizer.vocab_size,
    )
    for i, c in zip(indices, completions, strict=True):
      text = model.tokenizer.decode(c.ids)
      out[i] = generate.cut_at_stop(text, requests[i].stop)[0]
  return out
