"""The `jaxtune` command run as a user runs it, in subprocesses, for the tests."""

import os
import pathlib
import subprocess
import sys

JAXTUNE = [sys.executable, "-m", "jaxtune.cli"]
# A GQA model and data small enough that a run of a few steps takes seconds.
TINY_RUN = [
  "data.synthetic_examples=40",
  "data.max_length=128",
  "data.tokenizer_vocab_size=400",
  "model.vocab_size=416",
  "model.dim=32",
  "model.num_layers=2",
  "model.num_heads=4",
  "model.num_kv_heads=2",
  "model.mlp_dim=64",
  "train.held_out_prompts=2",  # Exact match on 2 prompts of each task: the path, cheaply.
]


def one_device_env(**extra: str) -> dict[str, str]:
  """This environment without XLA_FLAGS: one CPU device (conftest's 8 are set in-process only;
  its JAX_DISABLE_MOST_OPTIMIZATIONS is inherited)."""
  return {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, **extra}


def jaxtune(*args, cwd=None, stdin=None, env=None) -> subprocess.CompletedProcess:
  """`jaxtune ARGS...`, run to its end, with its output captured."""
  return subprocess.run(
    [*JAXTUNE, *map(str, args)],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=cwd,
    input=stdin,
    env=env,
  )


class Background:
  """A subprocess with its output in a file (a pipe could fill up and block it)."""

  def __init__(self, command: list[str], env: dict[str, str], log: pathlib.Path, cwd=None):
    self.log = log
    with open(log, "w") as f:
      self.process = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd)

  def output(self) -> str:
    return self.log.read_text()

  def finish(self, timeout: float = 300) -> tuple[int, str]:
    self.process.wait(timeout=timeout)
    return self.process.returncode, self.output()

  def kill(self) -> None:
    if self.process.poll() is None:
      self.process.kill()
      self.process.wait()
