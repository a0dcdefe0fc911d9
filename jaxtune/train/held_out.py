"""What a run learned, in numbers: greedy answers to held-out prompts and their exact match per
task family, before and after training, through the decoding path `jaxtune generate` uses.

The prompts are the first `train.held_out_prompts` held-out conversations of each family (an
embedded or Flan task's name, from a conversation's `where` such as `arithmetic[17]`; one family
"all" otherwise). They are decoded in one batch (one compiled shape, reused after training),
greedily, up to the longest reference's length; an answer matches when it equals the reference
up to surrounding whitespace.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from jaxtune import generate, runs
from jaxtune.config import Config
from jaxtune.data import packing, pipeline
from jaxtune.data.formats import Conversation
from jaxtune.peft import partition, prefix
from jaxtune.train import objective, reference

log = logging.getLogger(__name__)

_MAX_ANSWER_TOKENS = 64  # Longer references are not scored (a long answer is not exact-match).
_FAMILY = re.compile(r"^(\w+)\[\d+\]$")


def family(where: str) -> str:
  """The task a conversation comes from (`arithmetic[17]` -> `arithmetic`), else "all"."""
  m = _FAMILY.match(where)
  return m.group(1) if m else "all"


def exact_match(answer: str, reference: str) -> bool:
  return answer.strip() == reference.strip()


@dataclasses.dataclass(frozen=True)
class Prompts:
  """The scored held-out conversations with their prompt ids, and the answer budget."""

  conversations: tuple[Conversation, ...]
  ids: tuple[tuple[int, ...], ...]
  max_new_tokens: int
  images: tuple[np.ndarray, ...] | None = None  # Each prompt's [M, Y, X, C] (a LLaVA run's).


def select(
  held_out: Sequence[Conversation],
  tokenizer,
  template: str,
  max_seq_len: int,
  per_family: int,
  prompt_of: Callable[[Conversation], tuple[list[int], np.ndarray | None]] | None = None,
) -> Prompts:
  """Up to `per_family` conversations of each family, in their order, whose prompt and reference
  answer fit the model's positions. `prompt_of` (`pipeline.Data.prompt`): a prompt's ids and
  images; None: the text's ids."""
  prompt_of = prompt_of or (lambda head: (packing.prompt_ids(head, template, tokenizer), None))
  chosen: list[tuple[Conversation, list[int], np.ndarray | None, int]] = []
  counts: dict[str, int] = {}
  for conv in held_out:
    name = family(conv.where)
    if counts.get(name, 0) >= per_family:
      continue
    answer = len(tokenizer.encode(conv.messages[-1].content)) + 2  # A stop token and a spare.
    if answer > _MAX_ANSWER_TOKENS:
      continue
    prompt, images = prompt_of(dataclasses.replace(conv, messages=conv.messages[:-1]))
    if len(prompt) + answer <= max_seq_len:
      chosen.append((conv, prompt, images, answer))
      counts[name] = counts.get(name, 0) + 1
  budget = max((a for *_, a in chosen), default=0)
  # One budget for the whole batch: every prompt must leave room for it.
  kept = [(c, p, x) for c, p, x, _ in chosen if len(p) + budget <= max_seq_len]
  images = tuple(x for *_, x in kept)
  return Prompts(
    tuple(c for c, *_ in kept),
    tuple(tuple(p) for _, p, _ in kept),
    budget,
    images if images and images[0] is not None else None,
  )


def score(conversations: Sequence[Conversation], answers: Sequence[str]) -> dict[str, Any]:
  """Exact match per family and over all (each family weighing by its prompts), with counts."""
  hits: dict[str, list[bool]] = {}
  for conv, answer in zip(conversations, answers, strict=True):
    hits.setdefault(family(conv.where), []).append(exact_match(answer, conv.messages[-1].content))
  every = [h for v in hits.values() for h in v]
  return {
    "exact_match": {name: sum(v) / len(v) for name, v in hits.items()},
    "exact_match_all": sum(every) / max(len(every), 1),
    "prompts": {name: len(v) for name, v in hits.items()},
  }


def answer(model, params, prompts: Prompts, tokenizer, template: str, mesh, rules) -> list[str]:
  """Greedy answers to `prompts`, all in one batch."""
  completions = generate.generate(
    model,
    params,
    prompts.ids,
    generate.Sampling(max_new_tokens=prompts.max_new_tokens),
    stop_ids=generate.template_stop_ids(tokenizer, template),
    batch_size=len(prompts.ids),
    mesh=mesh,
    rules=rules,
    images=prompts.images,
    vocab_size=tokenizer.vocab_size,
  )
  return [tokenizer.decode(c.ids) for c in completions]


def evaluate(model, params, prompts: Prompts, tokenizer, template: str, mesh, rules):
  """(scores, answers) of `params` on `prompts`; None when no held-out prompt fits."""
  if not prompts.ids:
    return None
  answers = answer(model, params, prompts, tokenizer, template, mesh, rules)
  return score(prompts.conversations, answers), answers


def metrics(scores: dict[str, Any]) -> dict[str, float]:
  """A metrics.jsonl record's fields for `scores`."""
  return {
    "held_out_exact_match": scores["exact_match_all"],
    **{f"held_out_exact_match/{k}": v for k, v in scores["exact_match"].items()},
  }


def report(
  output_dir: str,
  prompts: Prompts,
  before: tuple[int, dict, list[str]],
  after: tuple[int, dict, list[str]],
  shown_per_family: int = 1,
) -> str:
  """The table of exact match per family before and after training, with a few answers; also
  written (with every answer) to the run's `held_out.json`. Returns the printed text."""
  (step0, s0, a0), (step1, s1, a1) = before, after
  lines = [f"\nheld-out exact match (greedy, {len(prompts.ids)} prompts):"]
  lines.append(f"  {'family':<12} {'n':>3} {f'step {step0}':>9} {f'step {step1}':>9}")
  for name, n in s1["prompts"].items():
    lines.append(
      f"  {name:<12} {n:>3} {s0['exact_match'][name]:>9.1%} {s1['exact_match'][name]:>9.1%}"
    )
  lines.append(
    f"  {'all':<12} {len(prompts.ids):>3} {s0['exact_match_all']:>9.1%} "
    f"{s1['exact_match_all']:>9.1%}"
  )
  shown: dict[str, int] = {}
  for conv, answer_text in zip(prompts.conversations, a1, strict=True):
    name = family(conv.where)
    if shown.get(name, 0) >= shown_per_family:
      continue
    shown[name] = shown.get(name, 0) + 1
    reference = conv.messages[-1].content
    mark = "right" if exact_match(answer_text, reference) else "wrong"
    lines.append(
      f"\n> {conv.messages[-2].content}\n{answer_text}\n({mark}; reference: {reference})"
    )
  text = "\n".join(lines)
  if jax.process_index() == 0:
    record = {
      "before": {"step": step0, **s0},
      "after": {"step": step1, **s1},
      "answers": [
        {
          "where": c.where,
          "prompt": c.messages[-2].content,
          "reference": c.messages[-1].content,
          "before": x0,
          "after": x1,
        }
        for c, x0, x1 in zip(prompts.conversations, a0, a1, strict=True)
      ],
    }
    with open(os.path.join(output_dir, runs.HELD_OUT), "w") as f:
      json.dump(record, f, indent=1)
  return text


class Answers:
  """Greedy answers to held-out prompts at the start and the end of training, scored by
  exact match; every process decodes (the parameters may span them all). `t` is the loop's
  Trainer."""

  def __init__(self, cfg: Config, t: Any, data: pipeline.Data, mesh: jax.sharding.Mesh):
    self.cfg, self.t, self.data, self.mesh = cfg, t, data, mesh
    # A reward model's scalar head generates nothing.
    generates = cfg.train.objective not in objective.SCORES_ONLY
    self.prompts = select(
      data.held_out if generates else [],
      data.tokenizer,
      cfg.data.template,
      cfg.model.max_seq_len,
      cfg.train.held_out_prompts,
      data.prompt,
    )
    if generates and data.held_out and not self.prompts.ids:
      log.info("no held-out prompt and answer fits model.max_seq_len: no exact match reported")
    self.results: list[tuple[int, dict, list[str]]] = []

  def __call__(self, step: int, trainable: Any) -> dict[str, float]:
    """The metrics.jsonl fields of the answers at `step` (none without prompts)."""
    t = self.t
    params = reference.without_copy(partition.combine(trainable, t.frozen))
    model, params = prefix.for_decoding(t.model, params)
    tok, template = self.data.tokenizer, self.cfg.data.template
    t0 = time.perf_counter()
    got = evaluate(model, params, self.prompts, tok, template, self.mesh, t.rules)
    if got is None:
      return {}
    scores, answers = got
    log.info(
      "step %d: held-out exact match %.1f%% on %d prompts (%.1f s)",
      step,
      100 * scores["exact_match_all"],
      len(answers),
      time.perf_counter() - t0,
    )
    self.results.append((step, scores, answers))
    return metrics(scores)
