"""jaxtune models inside EleutherAI's lm-evaluation-harness (`pip install 'jaxtune[harness]'`).

`JaxtuneLM(path, mesh=...)` is an `lm_eval.api.model.LM` serving any checkpoint `jaxtune.load`
reads, on a mesh, through the request types of `eval.requests`:

    import lm_eval
    from jaxtune.eval.harness import JaxtuneLM
    lm_eval.simple_evaluate(model=JaxtuneLM("runs/x", mesh=mesh), tasks=["hellaswag"])

It is also registered as the harness's model "jaxtune" (`model_args="path=...,batch_size=16"`)
once this module is imported. Text is tokenized as the harness's Hugging Face backend tokenizes it
for a Llama tokenizer (BOS first; see `requests.encode_text`), so both backends score the same
ids.

Multi-host: `JaxtuneLM` is one rank (`rank` 0 of `world_size` 1) on every process. Each process
must call `simple_evaluate` with the same tasks and arguments: every process then builds the same
requests in the same order and serves all of them together (the batches are sharded over every
device of the mesh, a collective all processes enter), and every process gets the same results.
Write them from process 0 only (`jax.process_index() == 0`), as `jaxtune eval --harness` does.
The harness's own data-parallel ranks (each rank a share of the requests) do not apply: a rank
that served only its share would leave the others' collectives waiting.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from jaxtune import generate
from jaxtune.errors import ConfigError
from jaxtune.eval import requests

try:
  # The harness fills its model registry on first use only if it is empty: fill it first, so that
  # registering "jaxtune" does not hide "hf" and the rest.
  import lm_eval.models  # noqa: F401
  from lm_eval.api.model import LM
  from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover: the message is the point.
  raise ImportError(
    "jaxtune.eval.harness needs lm-evaluation-harness: pip install 'jaxtune[harness]'"
  ) from e

log = logging.getLogger(__name__)


def _sampling(gen_kwargs: dict[str, Any], max_new_tokens: int) -> generate.Sampling:
  """The harness's generation kwargs as jaxtune's sampling: greedy unless `do_sample` with a
  positive temperature."""
  known = {"until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k"}
  unknown = sorted(set(gen_kwargs) - known)
  if unknown:
    raise ConfigError(f"generate_until: unsupported generation kwargs {', '.join(unknown)}")
  temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0)
  if not gen_kwargs.get("do_sample", False):
    temperature = 0.0
  return generate.Sampling(
    max_new_tokens=max_new_tokens,
    temperature=temperature,
    top_p=float(gen_kwargs.get("top_p", 1.0) or 1.0),
    top_k=int(gen_kwargs.get("top_k", 0) or 0),
  )


@register_model("jaxtune")
class JaxtuneLM(LM):
  """A jaxtune checkpoint (a path `jaxtune.load` reads, or a loaded model) as a harness LM.

  `mesh`: where to place it (None: one device); `batch_size`: rows per forward pass; `pack`:
  several short log-likelihood requests to a row; `max_gen_toks`: generate_until's default.
  """

  def __init__(
    self,
    path: Any = None,
    *,
    mesh: Any = None,
    batch_size: int | str = 8,
    max_gen_toks: int = 256,
    pack: bool = True,
    strategy: str | None = None,
    param_dtype: str | None = None,
    tokenizer: str | None = None,
  ):
    super().__init__()
    if path is None:
      raise ConfigError("JaxtuneLM needs a checkpoint: JaxtuneLM(path) or model_args='path=...'")
    if isinstance(path, str | bytes) or hasattr(path, "__fspath__"):
      import jaxtune

      path = jaxtune.load(
        path, mesh=mesh, strategy=strategy, param_dtype=param_dtype, tokenizer=tokenizer
      )
    if path.tokenizer is None:
      raise ConfigError("JaxtuneLM: the checkpoint has no tokenizer: pass tokenizer=")
    if not str(batch_size).isdigit() or int(batch_size) < 1:
      raise ConfigError(f"JaxtuneLM: batch_size={batch_size!r} must be a positive count")
    self.model = path
    self.batch_size = int(batch_size)
    self.max_gen_toks = int(max_gen_toks)
    self.pack = pack if isinstance(pack, bool) else str(pack).lower() == "true"

  def loglikelihood(self, requests_: Sequence[Any], disable_tqdm: bool = False):
    pairs = [tuple(r.args) for r in requests_]
    return requests.loglikelihood(self.model, pairs, self.batch_size, self.pack)

  def loglikelihood_rolling(self, requests_: Sequence[Any], disable_tqdm: bool = False):
    texts = [r.args[0] for r in requests_]
    return requests.loglikelihood_rolling(self.model, texts, self.batch_size, self.pack)

  def generate_until(self, requests_: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
    out: list[str] = [""] * len(requests_)
    groups: dict[str, list[int]] = {}  # Requests of one sampling setting run together.
    for i, r in enumerate(requests_):
      groups.setdefault(repr(sorted(r.args[1].items())), []).append(i)
    for indices in groups.values():
      gen_kwargs = dict(requests_[indices[0]].args[1])
      until = gen_kwargs.get("until") or []
      stop = (until,) if isinstance(until, str) else tuple(until)
      max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
      batch = [requests.Until(requests_[i].args[0], stop, max_new) for i in indices]
      texts = requests.generate_until(
        self.model, batch, self.batch_size, _sampling(gen_kwargs, max_new)
      )
      for i, text in zip(indices, texts, strict=True):
        out[i] = text
    return out


def evaluate(
  model: Any,
  tasks: Sequence[str],
  shots: int | None = None,
  limit: int = 0,
  include_path: str | None = None,
  batch_size: int = 8,
) -> dict[str, Any]:
  """The harness's `simple_evaluate` of `tasks` on a loaded model (`jaxtune eval --harness
  lm-eval`): its results, with every request logged (`samples`)."""
  from lm_eval import simple_evaluate
  from lm_eval.tasks import TaskManager

  return simple_evaluate(
    model=JaxtuneLM(model, batch_size=batch_size),
    tasks=list(tasks),
    num_fewshot=shots,
    limit=limit or None,
    task_manager=TaskManager(include_path=include_path) if include_path else None,
    log_samples=True,
  )


def table(results: dict[str, Any]) -> str:
  """The harness's own table of results."""
  from lm_eval.utils import make_table

  return make_table(results)
