"""The `jaxtune` command: one verb per job, each taking `--config FILE` and `section.key=value`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from jaxtune.config import ConfigError
from jaxtune.convert.llama2c import CheckpointError
from jaxtune.sharding import ShardingError

log = logging.getLogger("jaxtune")

# Errors that are the user's to fix: reported as one line, no traceback.
USER_ERRORS = (ConfigError, ShardingError, CheckpointError, FileNotFoundError)


def _train(args: argparse.Namespace) -> None:
  from jaxtune import config
  from jaxtune.train import loop

  loop.run(config.load(args.config, args.overrides))


def _planned(verb: str) -> Callable[[argparse.Namespace], None]:
  def run(args: argparse.Namespace) -> None:
    raise ConfigError(f"'jaxtune {verb}' is not available in this version yet")

  return run


_VERBS: dict[str, tuple[str, Callable[[argparse.Namespace], None]]] = {
  "train": ("fine-tune a model (the main job)", _train),
  "generate": ("sample completions from a checkpoint", _planned("generate")),
  "chat": ("chat with a checkpoint in the terminal", _planned("chat")),
  "eval": ("evaluate a checkpoint (perplexity, MMLU, GSM8K, BBH, ...)", _planned("eval")),
  "convert": ("convert checkpoints (Hugging Face, llama2.c, GQA uptraining)", _planned("convert")),
  "data": ("inspect, tokenize and pack instruction data", _planned("data")),
}


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="jaxtune",
    description="Instruction fine-tuning of decoder-only language models in JAX.",
    epilog="Configuration: defaults <- --config FILE <- section.key=value overrides.",
  )
  parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
  verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
  for verb, (help_text, run) in _VERBS.items():
    p = verbs.add_parser(verb, help=help_text, description=help_text)
    p.add_argument("--config", help="YAML file of config sections (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    p.set_defaults(run=run)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  logging.basicConfig(
    level=logging.DEBUG if args.verbose else logging.INFO,
    format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    datefmt="%H:%M:%S",
  )
  logging.getLogger("jax").setLevel(logging.WARNING)  # Not the absent-TPU notice on CPU and GPU.
  try:
    args.run(args)
  except USER_ERRORS as e:
    print(f"jaxtune {args.verb}: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"jaxtune {args.verb}: interrupted", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
