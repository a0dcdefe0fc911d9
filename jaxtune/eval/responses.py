"""`generation-stats`: the NEFTune paper's analysis of a model's responses to instructions, and
their ROUGE-L and BLEU against reference responses (see `metrics`).

Data: any instruction file the training pipeline reads (AlpacaEval's JSON reads as Alpaca
records; `--format` and `--fields` act as `data.format` and `data.fields`). Each record's
conversation without its last turn is the prompt, rendered with the checkpoint's chat template
unless `--template` says otherwise, and that last (assistant) turn is the reference. Responses
are greedy, with `--repetition-penalty` (the paper used 1.2), and end at EOS or the template's
end-of-turn token; they are kept in the result in AlpacaEval's form.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from jaxtune.data import packing
from jaxtune.errors import DataError
from jaxtune.eval import base, metrics

log = logging.getLogger(__name__)


def run(model: Any, options: base.Options) -> base.Result:
  template = options.template or model.template
  # A record without a reference (AlpacaEval's davinci outputs have an empty one) is skipped and
  # counted, with the reason logged; an unreadable file is still an error.
  conversations, stats = base.conversations(options, "generation-stats", on_bad_record="skip")
  prompts, kept = [], []
  for c in conversations:
    prompt = dataclasses.replace(c, messages=c.messages[:-1])
    ids = packing.prompt_ids(prompt, template, model.tokenizer)
    if len(ids) < model.config.max_seq_len:
      prompts.append(ids)
      kept.append(c)
  if len(kept) < len(conversations):
    log.warning(
      "%d of %d prompts are too long for the model's %d positions: skipped",
      len(conversations) - len(kept),
      len(conversations),
      model.config.max_seq_len,
    )
  if not kept:
    raise DataError(options.data, "no prompt fits the model's positions")
  skipped, conversations = len(conversations) - len(kept), kept
  responses = [r.strip() for r in base.complete(model, prompts, options, template)]
  references = [c.messages[-1].content for c in conversations]
  result_metrics = {
    **metrics.generation_stats(responses),
    **metrics.reference_scores(responses, references),
    "responses": len(responses),
    "skipped_too_long": skipped,
    "skipped_records": stats.skipped,
  }
  examples = [
    {
      "instruction": _instruction(c),
      "output": r,
      "generator": options.generator,
      "reference": ref,
      "where": c.where,
    }
    for c, r, ref in zip(conversations, responses, references, strict=True)
  ]
  return base.Result("generation-stats", result_metrics, {}, examples)


def _instruction(conversation: Any) -> str:
  """The last user turn, with its input (AlpacaEval's `instruction`)."""
  user = [m for m in conversation.messages if m.role == "user"][-1]
  return f"{user.content}\n\n{user.input}" if user.input else user.content
