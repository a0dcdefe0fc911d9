"""Orbax checkpoints: the train state (sharded, restorable onto any mesh) and the data iterator.

A checkpoint directory holds numbered steps, each with `state` (params, optimizer state, step)
and `data` (the iterator state, JSON). Saves are asynchronous; orbax writes each step into a
temporary directory and renames it when complete, so a crash during a save never damages the
last good checkpoint (and an unfinished one is never picked as the latest).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from jaxtune.errors import CheckpointError

log = logging.getLogger(__name__)


class Checkpointer:
  """Keeps the last `keep` checkpoints of a run under `directory`."""

  def __init__(self, directory: str, keep: int):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True),
      item_names=("state", "data"),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict[str, Any]) -> None:
    """Starts an asynchronous save of `state` and `data_state` as checkpoint `step`."""
    self.manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
      ),
    )

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores checkpoint `step` into the shapes and shardings of `abstract_state` (a tree of
    `jax.ShapeDtypeStruct` with shardings: any mesh)."""
    try:
      restored = self.manager.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
        ),
      )
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise CheckpointError(f"{self.directory}/{step}: cannot restore: {e}") from None
    return restored["state"], restored["data"]

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract(tree: Any, shardings: Any) -> Any:
  """`jax.ShapeDtypeStruct`s of `tree` carrying `shardings`: a restore target."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )


def restore_params(directory: str, abstract_params: Any, step: int | None = None) -> Any:
  """The parameters of checkpoint `step` (default: the latest) under `directory` (a run's
  `checkpoints/`), placed by the shardings of `abstract_params` and cast to its dtypes; the rest
  of the state is not kept."""
  if step is None:
    step = ocp.CheckpointManager(os.path.abspath(directory)).latest_step()
  if step is None:
    raise CheckpointError(f"{directory}: no checkpoint found")
  path = os.path.join(os.path.abspath(directory), str(step), "state")
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: no such checkpoint")
  checkpointer = ocp.StandardCheckpointer()
  tree = dict(ocp.StandardCheckpointHandler().metadata(epath.Path(path)))
  if "params" not in tree:
    raise CheckpointError(f"{path}: not a jaxtune train state (no params)")
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree)
  target["params"] = abstract_params
  try:
    return checkpointer.restore(path, target)["params"]
  except (ValueError, KeyError) as e:
    raise CheckpointError(f"{path}: the params do not fit the model: {e}") from None
