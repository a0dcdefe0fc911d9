"""What every claim script shares: its command line, training runs through `jaxtune`'s own loop,
the spread over seeds, and the result written as the row of the claims table.

A claim script is `benchmarks/claims/NAME.py` (it imports `claimlib`) with `main(argv) -> dict`;
it runs alone (`python benchmarks/claims/NAME.py [--quick] [--out DIR] [--seeds N]`) and writes
`DIR/claim_NAME.json` (and `claim_NAME.png`). The JSON holds one row of the table in
`benchmarks/README.md`: `claim`, `paper` (the paper's figure, quoted with its source),
`setting`, `ours` (our figure, as text) and `holds` ("yes", "no" or "partly"), with `why` where the
answer is not yes, plus whatever the script measured. `--quick` is a smoke run (tiny sizes, a few
steps, compiled without XLA's optimizations: `smoke_compiles`) that `tests/test_claims.py` runs
so no script rots; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import functools
import json
import os
import pathlib
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import common as bench  # noqa: E402  (benchmarks/common.py: the host's malloc)

from jaxtune import config  # noqa: E402
from jaxtune.train import loop  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
ROW = ("claim", "paper", "setting", "ours", "holds")
VERDICTS = ("yes", "no", "partly")
SHARED = "../shared/data/"  # How the recipes name the shared data.
COMPILED = pathlib.Path.home() / ".cache" / "jaxtune-claims"  # share_compiles's default.


def arguments(doc: str, argv: Sequence[str] | None, seeds: int = 3) -> argparse.Namespace:
  """The command line every claim script takes (plus nothing else, so a test can run any)."""
  parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="a smoke run; figures mean nothing")
  parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help="the JSON and plot")
  parser.add_argument("--seeds", type=int, default=seeds, help="seeds where noise could decide")
  args = parser.parse_args(argv)
  args.argv = list(sys.argv[1:] if argv is None else argv)  # As run: `write` records them.
  if args.quick:
    args.seeds = 1
    smoke_compiles()
  return args


def smoke_compiles() -> None:
  """A smoke run's programs: compiled without XLA's backend optimizations (compiling is most of
  a smoke run's time, and its figures mean nothing), and those its arms share compiled once, into
  a new folder (no earlier run's programs make it look cheaper than a fresh checkout's)."""
  import jax

  jax.config.update("jax_disable_most_optimizations", True)
  compiled = pathlib.Path(tempfile.mkdtemp(prefix="claims_compiled_"))
  atexit.register(shutil.rmtree, compiled, True)
  share_compiles(compiled)


def load(files: Sequence[str], overrides: Sequence[str]) -> config.Config:
  """The config of recipe `files` (relative to the project root) and `overrides`, its files in
  the shared data (`../shared/data/...` in the recipes) read from `data_dir()`."""
  files = [str(ROOT / f) for f in files]
  recipe = config.load(files, [])
  moved = [
    f"{key}={data_dir() / value.removeprefix(SHARED)}"
    for key, value in (
      ("data.path", recipe.data.path),
      ("data.tokenizer", recipe.data.tokenizer),
      ("data.eval_path", recipe.data.eval_path),
      ("train.init_from", recipe.train.init_from),
    )
    if value.startswith(SHARED)
  ]
  return config.load(files, [*moved, *overrides])


def train(files: Sequence[str], overrides: Sequence[str], out: pathlib.Path) -> dict[str, Any]:
  """One `jaxtune train` run (config files relative to the project root, then `overrides`), in
  process; returns its summary with the loss curves from its `metrics.jsonl`."""
  cfg = load(files, [*overrides, f"train.output_dir={out}"])
  t0 = time.perf_counter()
  summary = loop.run(cfg)
  records = [json.loads(line) for line in open(pathlib.Path(out) / "metrics.jsonl")]
  return {
    **summary,
    "wall_s": time.perf_counter() - t0,
    "train": [(r["step"], r["loss"]) for r in records if "loss" in r],
    "eval": [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r],
  }


def spread(values: Sequence[float]) -> dict[str, Any]:
  """Mean and sample standard deviation over seeds (0 for one seed), with the values."""
  values = [float(v) for v in values]
  std = statistics.stdev(values) if len(values) > 1 else 0.0
  return {"mean": statistics.fmean(values), "std": std, "values": values}


def write(args: argparse.Namespace, name: str, result: dict[str, Any]) -> pathlib.Path:
  """Writes `result` (a table row and its measurements) to `args.out/claim_NAME.json`, stamped
  with the machine, the date and the command as it was run; returns the path."""
  missing = [k for k in ROW if k not in result]
  if missing or result["holds"] not in VERDICTS:
    raise ValueError(f"claim {name}: a row needs {ROW}, holds in {VERDICTS}; missing {missing}")
  args.out.mkdir(parents=True, exist_ok=True)
  path = args.out / f"claim_{name}.json"
  stamp = {
    "machine": bench.machine(),
    "date": datetime.date.today().isoformat(),
    "command": shlex.join(["python", f"benchmarks/claims/{name}.py", *args.argv]),
    "quick": args.quick,
  }
  path.write_text(json.dumps({**stamp, **result}, indent=1))
  return path


# What every smoke run sets, whatever its model: one warm-up step, and a nominal peak FLOP/s for
# the MFU it reports (measuring the host's takes seconds, and a smoke run's figures mean nothing).
QUICK_RUN = ("train.warmup_steps=1", "train.peak_flops=1e12")
# A smoke run's model and data: small enough that `--quick` compiles and steps in seconds.
QUICK = (
  "model.dim=32",
  "model.num_layers=1",
  "model.num_heads=4",
  "model.num_kv_heads=4",
  "model.mlp_dim=64",
  "model.vocab_size=416",
  "data.tokenizer_vocab_size=400",
  "data.max_length=128",
  "train.batch_size=8",
  "data.synthetic_examples=40",
  "train.held_out_prompts=0",
  *QUICK_RUN,
)


def commit() -> str:
  """The commit the figures were measured on ("-dirty" when the tree has changes)."""

  def git(*args: str) -> str:
    return subprocess.run(
      ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()

  return git("rev-parse", "--short", "HEAD") + ("-dirty" if git("status", "--porcelain") else "")


def share_compiles(directory: pathlib.Path = COMPILED) -> None:
  """Keeps compiled programs in `directory` (JAX's persistent cache), so that runs of the same
  shapes (seeds of one setting, the arms of a sweep that share a step) compile once. Call before
  the first run. A cache the environment names (`JAX_COMPILATION_CACHE_DIR`: the test suite's,
  shared by its processes) is kept."""
  import jax

  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return
  jax.config.update("jax_compilation_cache_dir", str(directory))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def data_dir() -> pathlib.Path:
  """The shared real data (`$JAXTUNE_DATA_DIR`, else `../shared/data` beside the project)."""
  path = pathlib.Path(os.environ.get("JAXTUNE_DATA_DIR", ROOT.parent / "shared" / "data"))
  if not path.is_dir():
    raise FileNotFoundError(f"shared data folder {path} not found (set JAXTUNE_DATA_DIR)")
  return path


def lima_split(
  work: pathlib.Path, held_out: int, train_records: int = 0
) -> tuple[pathlib.Path, pathlib.Path]:
  """LIMA split in two files under `work`: the last `held_out` single-turn records (held-out
  instructions with their reference responses), and the rest (the training set; its first
  `train_records` if not 0)."""
  records = json.loads((data_dir() / "lima" / "lima_train_llamafactory.json").read_text())
  single = [i for i, r in enumerate(records) if not r.get("history")]
  kept = set(single[-held_out:])
  train_path, eval_path = work / "lima_train.json", work / "lima_heldout.json"
  train = [r for i, r in enumerate(records) if i not in kept]
  train_path.write_text(json.dumps(train[:train_records] if train_records else train))
  eval_path.write_text(json.dumps([records[i] for i in sorted(kept)]))
  return train_path, eval_path


def lima_finetune(work: pathlib.Path, sizes: dict[str, Any], lr: float, quick: bool) -> list[str]:
  """Overrides of a stories260K fine-tune on a LIMA split written under `work` (`sizes`:
  held_out, train_records, length, steps), NEFTune off, learning rate `lr` decaying to a tenth,
  no final checkpoint: the setting the LoRA and prefix-tuning claims compare methods in."""
  train_path, eval_path = lima_split(work, sizes["held_out"], sizes["train_records"])
  return [
    f"data.path={train_path}",
    f"data.eval_path={eval_path}",
    "data.eval_size=0",
    f"data.max_length={sizes['length']}",
    "train.batch_size=8",
    f"train.steps={sizes['steps']}",
    f"train.eval_every={max(sizes['steps'] // 6, 1)}",
    "train.neftune_alpha=0",
    "train.held_out_prompts=0",
    "train.checkpoint_every=100000",
    "train.final_checkpoint=false",  # Measured by the loop's held-out losses alone.
    "train.log_every=5",
    f"train.learning_rate={lr}",
    f"train.end_learning_rate={lr / 10}",
    *(QUICK_RUN if quick else ()),
  ]


def pyplot():
  """matplotlib's pyplot on the Agg backend (no display)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def errorbars(ax, xs: Sequence[Any], spreads: Sequence[dict[str, Any]], **kwargs: Any) -> None:
  """Means with one standard deviation over seeds as error bars, and each seed as a dot."""
  means = [s["mean"] for s in spreads]
  ax.errorbar(xs, means, yerr=[s["std"] for s in spreads], capsize=3, marker="o", **kwargs)
  for x, s in zip(xs, spreads, strict=True):
    ax.scatter([x] * len(s["values"]), s["values"], s=8, alpha=0.4, color="gray")


def param_counts(files: Sequence[str], overrides: Sequence[str]) -> dict[str, int]:
  """The parameters of a run's model (`params`, with any adapters), those it trains
  (`trainable`) and those of its base model alone (`base`), from shapes only."""
  params, trainable = _counts(tuple(files), _settings(overrides))
  base, _ = _counts(tuple(files), _settings([*overrides, "peft.method=none"]))
  return {"params": params, "trainable": trainable, "base": base}


def _settings(overrides: Sequence[str]) -> tuple[str, ...]:
  """`overrides` as the settings they make (the last of a key wins), in one order: the same
  model is counted once (`_counts`)."""
  return tuple(sorted({o.split("=", 1)[0]: o for o in overrides}.values()))


@functools.cache
def _counts(files: tuple[str, ...], overrides: tuple[str, ...]) -> tuple[int, int]:
  from jaxtune import sharding

  cfg = load(files, overrides)
  t = loop.build(cfg, sharding.make_mesh(cfg.mesh), 1, shapes_only=True)
  return t.n_params, t.n_trainable
