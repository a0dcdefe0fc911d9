"""The `jaxtune` command: one verb per job, each taking `--config FILE` and `section.key=value`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from jaxtune import commands, host
from jaxtune.errors import JaxtuneError, TrainingError

log = logging.getLogger("jaxtune")

# Errors that are the user's to fix: reported as one line, no traceback.
USER_ERRORS = (JaxtuneError, TrainingError, FileNotFoundError)


def _config(args: argparse.Namespace):
  from jaxtune import config

  paths = [a for a in args.args if "=" not in a]  # Config files, applied in order.
  return config.load(paths, [a for a in args.args if "=" in a])


def _train(args: argparse.Namespace) -> None:
  from jaxtune import config, distributed
  from jaxtune.train import loop, ppo_run

  cfg = _config(args)
  config.check_paths(cfg)
  distributed.join(cfg.distributed)
  # PPO's iterations of rollouts and updates have a driver of their own.
  (ppo_run.run if cfg.train.objective == "ppo" else loop.run)(cfg)


def _data(args: argparse.Namespace) -> None:
  from jaxtune.data import inspect, inspect_images

  cfg = _config(args)
  # A LLaVA run's config (vision.encoder) knows its image's tokens; --image-tokens overrides.
  image_tokens = args.image_tokens or (
    cfg.vision.llava(cfg.model).image_tokens if cfg.vision.enabled else 0
  )
  if image_tokens:
    print(inspect_images.report(cfg, image_tokens, args.num_examples))
    return
  print(inspect.report(cfg, args.num_examples))


_VERBS: dict[str, tuple[str, Callable[[argparse.Namespace], None]]] = {
  "train": ("fine-tune a model (the main job)", _train),
  "generate": ("sample completions from a checkpoint", commands.RUN["generate"]),
  "chat": ("chat with a checkpoint in the terminal", commands.RUN["chat"]),
  "eval": ("evaluate a checkpoint (perplexity, MMLU, GSM8K, BBH, ...)", commands.RUN["eval"]),
  "convert": (
    "convert checkpoints (Hugging Face, llama2.c, GQA uptraining)",
    commands.RUN["convert"],
  ),
  "data": ("inspect instruction data: rendered examples, loss masks, statistics", _data),
}


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="jaxtune",
    description="Instruction fine-tuning of decoder-only language models in JAX.",
    epilog="Configuration: defaults <- CONFIG files (YAML, see configs/; later ones override) "
    "<- section.key=value.",
  )
  parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
  verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
  for verb, (help_text, run) in _VERBS.items():
    p = verbs.add_parser(verb, help=help_text, description=help_text)
    if verb == "data":
      p.add_argument("action", choices=["inspect"], help="what to do with the data")
      p.add_argument("-n", "--num-examples", type=int, default=3, help="examples to print")
      p.add_argument(
        "--image-tokens",
        type=int,
        default=0,
        metavar="S",
        help="LLaVA data (data.path): each <image> takes S tokens (the encoder's patches; "
        "default: the config's vision section)",
      )
    elif verb in commands.ARGUMENTS:
      commands.ARGUMENTS[verb](p)
    mesh_only = verb in commands.CHECKPOINT_VERBS
    p.add_argument(
      "args",
      nargs="*",
      metavar="[mesh.key=value | distributed.key=value ...]"
      if mesh_only
      else "[CONFIG ...] [section.key=value ...]",
      help="the device mesh, as for training"
      if mesh_only
      else "a YAML config file and/or overrides",
    )
    p.set_defaults(run=run)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  host.keep_freed_memory()  # Before JAX starts its threads.
  parser = _parser()
  args, extra = parser.parse_known_args(argv)  # Options and overrides may come in any order.
  if any(a.startswith("-") for a in extra):
    parser.error(f"unrecognized arguments: {' '.join(extra)}")
  args.args += extra
  logging.basicConfig(
    level=logging.DEBUG if args.verbose else logging.INFO,
    format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    datefmt="%H:%M:%S",
    force=True,  # absl (imported by orbax) may already have configured the root logger.
  )
  logging.getLogger("jax").setLevel(logging.WARNING)  # Not the absent-TPU notice on CPU and GPU.
  logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax's per-save INFO lines.
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
