"""The verbs that take a checkpoint (`jaxtune.load`): `generate`, `chat` and `eval` run it on a
mesh set by `mesh.*` overrides like training's (default: every device on the data axis), prompts
rendered through its chat template; `convert` writes it in another format.

- `generate`: `--prompt TEXT` prints the completion; `--prompts-file FILE` (JSONL or a JSON array
  of records with an `instruction`, AlpacaEval's form) writes one JSON line per record with its
  `output` and `generator` added, to `--output` or the standard output.
- `chat`: a multi-turn conversation in the terminal, the reply streamed as it is generated.
- `eval`: a task of `jaxtune.eval.runner.TASKS` (`--task`); the result as a table on screen and as
  JSON (`--output`, default `RUN/eval/TASK.json` for a jaxtune run, else
  `runs/eval/NAME/TASK.json`). `--tasks a,b --shots 0,1,k`: in-context tasks as data
  (`eval.tasks`), GPT-3's table (`eval.incontext`), JSON and an SVG plot beside it
  (`incontext.json`, `incontext.svg`); with `--harness lm-eval`, lm-evaluation-harness's tasks
  through `eval.harness.JaxtuneLM` (`lm-eval.json`).
- `convert`: `jaxtune convert SRC DST --to jaxtune|hf|peft` (see `convert/export.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import pathlib
import sys
from collections.abc import Callable
from typing import Any

from jaxtune import runs
from jaxtune.errors import ConfigError, DataError


def _sampling_arguments(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("sampling")
  g.add_argument("--max-new-tokens", type=int, default=256, metavar="N")
  g.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0: greedy")
  g.add_argument("--top-k", type=int, default=0, metavar="K", help="0: off")
  g.add_argument("--top-p", type=float, default=1.0, metavar="P", help="1: off")
  g.add_argument(
    "--repetition-penalty", type=float, default=1.0, metavar="R", help="1: off; NEFTune used 1.2"
  )
  g.add_argument("--seed", type=int, default=0)


# What `jaxtune.load` reads.
CHECKPOINT_HELP = (
  "a jaxtune run directory (or one of its checkpoints/<step>), a Hugging Face folder "
  "(config.json + safetensors) or a llama2.c model file (.bin)"
)


def _model_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("checkpoint", help=CHECKPOINT_HELP)
  p.add_argument("--template", help="chat template (default: the checkpoint's; 'raw' if none)")
  p.add_argument("--tokenizer", help="a tokenizer to use instead of the checkpoint's own")
  p.add_argument("--batch-size", type=int, default=8, metavar="B", help="prompts per batch")


def _image_argument(p: argparse.ArgumentParser) -> None:
  p.add_argument(
    "--image",
    action="append",
    default=[],
    metavar="PATH",
    help="an image to ask about (a LLaVA checkpoint); repeat for several",
  )


def generate_arguments(p: argparse.ArgumentParser) -> None:
  _model_arguments(p)
  _image_argument(p)
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--prompt", metavar="TEXT", help="one prompt (the user's turn)")
  source.add_argument(
    "--prompts-file", metavar="FILE", help="JSONL or JSON records with an 'instruction'"
  )
  p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="a stop string")
  p.add_argument("--output", metavar="FILE", help="write the JSON lines here (--prompts-file)")
  _force_argument(p)
  p.add_argument("--generator", help="the 'generator' of the records (default: the checkpoint)")
  _sampling_arguments(p)


def chat_arguments(p: argparse.ArgumentParser) -> None:
  _model_arguments(p)
  _image_argument(p)
  p.add_argument("--system", metavar="TEXT", help="a system prompt, if the template has a place")
  _sampling_arguments(p)


def eval_arguments(p: argparse.ArgumentParser) -> None:
  from jaxtune.eval import runner

  _model_arguments(p)
  which = p.add_mutually_exclusive_group(required=True)
  which.add_argument("--task", choices=list(runner.TASKS))
  which.add_argument(
    "--tasks",
    help="in-context tasks, comma-separated: built-in names (ecqa, qasc, strategyqa, creak, "
    "mmlu:SUBJECT, ...) or task .yaml files; with --harness, the harness's task names",
  )
  p.add_argument("--harness", choices=["lm-eval"], help="run --tasks in lm-evaluation-harness")
  p.add_argument("--include-path", help="--harness: a folder of the harness's task YAML files")
  p.add_argument(
    "--data",
    default="",
    help="MMLU: its data folder (dev/ and the split); GSM8K: a JSONL file; BBH: a task .json or "
    "a folder of them; perplexity, generation-stats: an instruction data file; --tasks: the "
    "folder the tasks' files are under (default: $JAXTUNE_DATA_DIR)",
  )
  p.add_argument(
    "--exemplars", default="", help="GSM8K: the exemplars' file; BBH: the cot-prompts folder"
  )
  p.add_argument(
    "--shots",
    help="exemplars per prompt (MMLU 5, GSM8K 8, BBH 3); --tasks: a list such as 0,1,k (k: each "
    "task's own few-shot count)",
  )
  p.add_argument("--limit", type=int, default=0, help="questions per subject or task (0: all)")
  p.add_argument("--split", default="test", help="MMLU's split to score (exemplars: dev)")
  p.add_argument("--subjects", default="", help="MMLU subjects or BBH tasks, comma-separated")
  p.add_argument("--format", default="auto", help="instruction data: as data.format")
  p.add_argument("--fields", default="", help="instruction data: as data.fields")
  p.add_argument("--max-new-tokens", type=int, default=256, metavar="N")
  p.add_argument(
    "--repetition-penalty", type=float, default=1.0, metavar="R", help="NEFTune used 1.2"
  )
  p.add_argument("--output", metavar="FILE", help="the JSON result (default: see jaxtune eval)")
  _force_argument(p)


def _force_argument(p: argparse.ArgumentParser) -> None:
  p.add_argument("--force", action="store_true", help="overwrite an existing --output file")


def _check_output(path: str, force: bool) -> None:
  """Refuses to overwrite a file without --force, before any work."""
  if os.path.isdir(path):
    raise ConfigError(f"--output {path}: is a folder")
  if os.path.exists(path) and not force:
    raise ConfigError(f"--output {path}: the file exists; pass --force to overwrite it")


def _check_positive(args: argparse.Namespace, *names: str) -> None:
  for name in names:
    value = getattr(args, name)
    if value < 1:
      raise ConfigError(f"--{name.replace('_', '-')} {value}: must be positive")


def _load(args: argparse.Namespace) -> Any:
  """The checkpoint on the mesh that `mesh.*` overrides describe, in the multi-process run that
  `distributed.*` overrides (or the environment) describe; no other override."""
  import jaxtune
  from jaxtune import config, distributed, sharding

  for item in args.args:
    if not item.startswith(("mesh.", "distributed.")):
      raise ConfigError(
        f"'jaxtune {args.verb}' takes only mesh.* and distributed.* overrides, got {item!r}"
      )
  cfg = config.load(None, args.args)
  distributed.join(cfg.distributed)
  mesh_cfg = cfg.mesh
  given = {item.partition("=")[0] for item in args.args}
  strategy = mesh_cfg.strategy if "mesh.strategy" in given else None  # Else a run's own.
  model = jaxtune.load(
    args.checkpoint, mesh=sharding.make_mesh(mesh_cfg), strategy=strategy, tokenizer=args.tokenizer
  )
  if model.tokenizer is None:
    raise ConfigError(f"{args.checkpoint} has no tokenizer: pass one with --tokenizer")
  if args.template:
    from jaxtune.data import templates

    if args.template not in templates.TEMPLATES:
      raise ConfigError(f"--template {args.template}: known: {', '.join(templates.TEMPLATES)}")
    model = dataclasses.replace(model, template=args.template)
  return model


def _sampling(args: argparse.Namespace):
  from jaxtune import generate

  sampling = generate.Sampling(
    max_new_tokens=args.max_new_tokens,
    temperature=args.temperature,
    top_k=args.top_k,
    top_p=args.top_p,
    repetition_penalty=args.repetition_penalty,
  )
  sampling.validate()
  return sampling


def _prompt_ids(model: Any, messages: list) -> list[int]:
  from jaxtune.data import packing
  from jaxtune.data.formats import Conversation

  return packing.prompt_ids(Conversation(tuple(messages)), model.template, model.tokenizer)


def _name(checkpoint: str) -> str:
  path = pathlib.Path(checkpoint).resolve()
  return path.stem if path.suffix == ".bin" else path.name


def _records(path: str) -> list[tuple[dict[str, Any], Any]]:
  """(record, user message) of each record of a prompts file."""
  from jaxtune.data.formats import Message
  from jaxtune.data.sources import read_records

  out = []
  for record in read_records(path):
    fields = record.fields
    if not isinstance(fields.get("instruction"), str):
      raise DataError(record.where, "field 'instruction': missing or not a string")
    extra = fields.get("input", "")
    if not isinstance(extra, str):
      raise DataError(record.where, "field 'input': not a string")
    out.append((fields, Message("user", fields["instruction"], extra)))
  return out


def generate(args: argparse.Namespace) -> None:
  from jaxtune import generate as engine
  from jaxtune.data.formats import Message

  sampling = _sampling(args)
  _check_positive(args, "batch_size")
  if args.output:
    _check_output(args.output, args.force)
  if args.image and args.prompt is None:
    raise ConfigError("--image goes with --prompt")
  model = _load(args)
  if args.prompt is not None:
    records = [({}, Message("user", args.prompt))]
  else:
    records = _records(args.prompts_file)
  images = None
  if args.image:
    ids, pixels = model.image_prompt([records[0][1]], args.image)
    prompts, images = [ids], [pixels]
  else:
    prompts = [_prompt_ids(model, [message]) for _, message in records]
  outs = model.generate(
    prompts,
    sampling,
    seed=args.seed,
    batch_size=args.batch_size,
    progress=len(prompts) > 1,
    images=images,
  )
  texts = [engine.cut_at_stop(model.tokenizer.decode(o.ids), args.stop)[0] for o in outs]
  if args.prompt is not None:
    print(texts[0])
    return
  generator = args.generator or _name(args.checkpoint)
  lines = [
    json.dumps({**record, "output": text, "generator": generator}, ensure_ascii=False)
    for (record, _), text in zip(records, texts, strict=True)
  ]
  if args.output:
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
      f.write("".join(f"{line}\n" for line in lines))
    print(f"{len(lines)} outputs written to {args.output}", file=sys.stderr)
  else:
    print("\n".join(lines))


def _stream_reply(model: Any, ids: list[int], sampling: Any, seed: int, images=None) -> str:
  """Prints the reply as it comes (holding back an incomplete UTF-8 character); returns it.
  `images` [M, Y, X, C]: the images of the prompt's image tokens."""
  from jaxtune import generate as engine

  stop_ids = engine.template_stop_ids(model.tokenizer, model.template)
  tokens: list[int] = []
  shown = text = ""
  for token in engine.stream(
    model.module,
    model.params,
    ids,
    sampling,
    stop_ids=stop_ids,
    seed=seed,
    mesh=model.mesh,
    rules=model.rules,
    images=images,
    vocab_size=model.tokenizer.vocab_size,
  ):
    tokens.append(token)
    text = model.tokenizer.decode(tokens)
    complete = text.rstrip("\ufffd")
    if len(complete) > len(shown):
      print(complete[len(shown) :], end="", flush=True)
      shown = complete
  print(text[len(shown) :], flush=True)
  return text


def chat(args: argparse.Namespace) -> None:
  from jaxtune.data import templates
  from jaxtune.data.formats import Message

  sampling = _sampling(args)
  model = _load(args)
  template = templates.TEMPLATES[model.template]
  if args.system and not (template.system or template.first_user):
    raise ConfigError(f"--system: the {model.template!r} template has no place for a system prompt")
  system = [Message("system", args.system)] if args.system else []
  history: list = []
  images = None

  def prompt_ids(messages):
    """The prompt; with --image, the images ride with the first user turn still kept."""
    nonlocal images
    if not args.image:
      return _prompt_ids(model, messages)
    ids, images = model.image_prompt(messages, args.image)
    return ids

  print("Chat: an empty line or end of input quits; /reset starts over.", file=sys.stderr)
  for turn in itertools.count():
    try:
      text = input("> ")
    except EOFError:
      break
    if not text.strip():
      break
    if text.strip() == "/reset":
      history = []
      continue
    history.append(Message("user", text))
    ids = prompt_ids(system + history)
    while len(ids) >= model.config.max_seq_len and len(history) > 1:  # Forget the oldest turns.
      history = history[2:]
      ids = prompt_ids(system + history)
    if len(ids) >= model.config.max_seq_len:
      print(f"(too long for the model's {model.config.max_seq_len} positions)", file=sys.stderr)
      history = []
      continue
    reply = _stream_reply(model, ids, sampling, args.seed + turn, images)
    history.append(Message("assistant", reply))


def _default_output(checkpoint: str, task: str) -> str:
  """RUN/eval/TASK.json for a jaxtune run (or one of its checkpoints/<step>), else
  runs/eval/NAME/TASK.json."""
  from jaxtune import api

  path = pathlib.Path(checkpoint)
  if api.detect(path) == "jaxtune":
    run, _ = runs.run_and_step(path)
    return str(run / "eval" / f"{task}.json")
  return os.path.join("runs", "eval", _name(checkpoint), f"{task}.json")


def evaluate(args: argparse.Namespace) -> None:
  if args.tasks:
    return _evaluate_tasks(args)
  if args.harness:
    raise ConfigError("--harness runs --tasks, not --task")
  if not args.data:
    raise ConfigError(f"--task {args.task} needs --data")
  import jax

  from jaxtune.eval import base, runner

  try:
    shots = None if args.shots is None else int(args.shots)
  except ValueError:
    raise ConfigError(f"--task {args.task}: --shots {args.shots} must be one count") from None
  options = base.Options(
    data=args.data,
    format=args.format,
    fields=args.fields,
    exemplars=args.exemplars,
    shots=shots,
    limit=args.limit,
    batch_size=args.batch_size,
    max_new_tokens=args.max_new_tokens,
    template=args.template,
    split=args.split,
    subjects=tuple(s.strip() for s in args.subjects.split(",") if s.strip()),
    repetition_penalty=args.repetition_penalty,
    generator=_name(args.checkpoint),
  )
  options.validate()  # Before the model loads, as is the output file.
  output = args.output or _default_output(args.checkpoint, args.task)
  _check_output(output, args.force)
  model = _load(args)
  result = runner.evaluate(model, args.task, options)
  if jax.process_index() != 0:
    return
  runner.save(result, output, checkpoint=str(args.checkpoint), options=dataclasses.asdict(options))
  print(runner.table(result))
  print(f"results written to {output}", file=sys.stderr)


def _evaluate_tasks(args: argparse.Namespace) -> None:
  """`--tasks`: in-context tasks as data, or the harness's tasks with `--harness lm-eval`."""
  import jax

  names = [t.strip() for t in args.tasks.split(",") if t.strip()]
  _check_positive(args, "batch_size")
  if args.limit < 0:
    raise ConfigError(f"--limit {args.limit}: must not be negative (0: all)")
  stem = "lm-eval" if args.harness else "incontext"
  output = args.output or _default_output(args.checkpoint, stem)
  _check_output(output, args.force)
  if args.harness:
    from jaxtune.eval import harness

    if args.shots is not None and not args.shots.isdigit():
      raise ConfigError(f"--harness: --shots {args.shots} must be one count")
    shots = None if args.shots is None else int(args.shots)
    model = _load(args)
    run = harness.evaluate(model, names, shots, args.limit, args.include_path, args.batch_size)
    report, record = harness.table(run), run
  else:
    from jaxtune.eval import incontext

    shots = incontext.parse_shots(args.shots or "0,1,k")
    data_dir = args.data or os.environ.get("JAXTUNE_DATA_DIR", "")
    if not data_dir:
      raise ConfigError("--tasks needs --data (the folder the tasks' files are under)")
    found = incontext.find_tasks(names, args.limit)
    model = _load(args)
    cells = incontext.run_all(model, found, shots, data_dir, args.batch_size)
    report = incontext.table(cells, shots, {t.name: t.shots for t in found})
    record = incontext.record(cells, shots)
    if jax.process_index() == 0:
      incontext.svg_plot(cells, os.path.splitext(output)[0] + ".svg")
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  with open(output, "w", encoding="utf-8") as f:
    json.dump({"checkpoint": str(args.checkpoint), **record}, f, indent=2, default=str)
    f.write("\n")
  print(report)
  print(f"results written to {output}", file=sys.stderr)


def convert(args: argparse.Namespace) -> None:
  from jaxtune.convert import export

  if args.args:
    raise ConfigError(f"'jaxtune convert' takes no config file or overrides, got {args.args}")
  export.convert(args.src, args.dst, args.to, args.kv_heads, args.dtype, args.pack_ternary)


def convert_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("src", help=CHECKPOINT_HELP)
  p.add_argument("dst", help="the directory to write (new or empty)")
  p.add_argument(
    "--to",
    required=True,
    choices=["jaxtune", "hf", "peft"],
    help="the format to write (peft: a LoRA fine-tune's adapters, for Hugging Face PEFT)",
  )
  p.add_argument(
    "--kv-heads",
    type=int,
    metavar="K",
    help="first mean-pool the K/V heads into K (GQA/MQA uptraining; see configs/uptrain_gqa.yaml)",
  )
  p.add_argument(
    "--pack-ternary",
    action="store_true",
    help="a model.linear=bitnet158 model as its packed inference model (2 bits a weight)",
  )
  p.add_argument(
    "--dtype",
    choices=["float32", "bfloat16", "float16"],
    help="the parameters' dtype (default: as stored; float16 only with --to hf)",
  )


ARGUMENTS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
  "generate": generate_arguments,
  "chat": chat_arguments,
  "eval": eval_arguments,
  "convert": convert_arguments,
}
CHECKPOINT_VERBS = ("generate", "chat", "eval")  # Verbs that take a checkpoint and a mesh.
RUN: dict[str, Callable[[argparse.Namespace], None]] = {
  "generate": generate,
  "chat": chat,
  "eval": evaluate,
  "convert": convert,
}
