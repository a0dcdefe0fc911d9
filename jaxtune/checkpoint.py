"""Orbax checkpoints: the train state (sharded, restorable onto any mesh) and the data iterator,
each checked on the way in and out.

A checkpoint directory holds numbered steps, each with `state` (params, optimizer state, step)
and `data` (the iterator state, JSON). Saves are asynchronous; orbax writes each step into a
temporary directory and renames it when complete, so a crash during a save never damages the
last good checkpoint (and an unfinished one is never picked as the latest).

Integrity: once a save is final (at the next save, or at `close`), process 0 writes the step's
`MANIFEST`, the size and SHA-256 of each of its files, read back from the final files; restoring
checks them first. A step without one is "unverified" (saved before jaxtune wrote manifests, or
the run stopped before its save was checked): it is still tried, and anything orbax cannot read
in it counts as damage. A state that is not finite is never saved, and never restored.

Damage is a `CorruptCheckpointError`: resuming moves the damaged step aside (`<step>.corrupt`,
never deleted) and goes on from the newest good one; `restore_params` (`jaxtune.load` and the
verbs) falls back to it, leaving the folder as it is. Retention is done here, not by orbax:
the newest `keep` verified steps are kept, so an unverified step never replaces the last good one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from jaxtune import distributed
from jaxtune.errors import CheckpointError, CorruptCheckpointError
from jaxtune.finite import all_finite

log = logging.getLogger(__name__)

MANIFEST = "manifest.jaxtune.json"
CORRUPT = ".corrupt"  # The suffix of a step moved aside.
_ITEMS = ("state", "data")  # The folders of a step that hold what is saved.
_all_finite = jax.jit(all_finite)


def steps(directory: str | os.PathLike) -> list[int]:
  """The complete steps under `directory`, newest first (orbax's temporary folders and the
  steps moved aside have other names)."""
  folder = pathlib.Path(directory)
  if not folder.is_dir():
    return []
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and p.is_dir())[::-1]


def _digest(path: pathlib.Path) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def _files(step_dir: pathlib.Path) -> dict[str, list]:
  """Relative path -> [size, sha256] of every file of the step's items."""
  files = {}
  for item in _ITEMS:
    for path in sorted((step_dir / item).rglob("*")):
      if path.is_file():
        files[str(path.relative_to(step_dir))] = [path.stat().st_size, _digest(path)]
  return files


def write_manifest(step_dir: pathlib.Path) -> None:
  """Writes the manifest of a final step (atomically: a manifest is never half written)."""
  tmp = step_dir / f"{MANIFEST}.tmp"
  tmp.write_text(json.dumps({"files": _files(step_dir)}, indent=0))
  os.replace(tmp, step_dir / MANIFEST)


def verify(step_dir: pathlib.Path) -> bool:
  """True if the step's files match its manifest, False if it has none (unverified); raises
  `CorruptCheckpointError` naming the first file that is missing, unreadable or altered."""
  if not (step_dir / MANIFEST).is_file():
    return False
  try:
    expected = json.loads((step_dir / MANIFEST).read_text())["files"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CorruptCheckpointError(f"{step_dir}: unreadable {MANIFEST} ({e})") from None
  for name, (size, digest) in expected.items():
    path = step_dir / name
    if not path.is_file():
      raise CorruptCheckpointError(f"{step_dir}: {name} is missing")
    try:
      if path.stat().st_size != size or _digest(path) != digest:
        raise CorruptCheckpointError(f"{step_dir}: {name} does not match its checksum")
    except OSError as e:
      raise CorruptCheckpointError(f"{step_dir}: cannot read {name} ({e.strerror})") from None
  return True


def _check_verified(step_dir: pathlib.Path) -> bool:
  verified = verify(step_dir)
  if not verified:
    log.warning("%s has no %s: restoring it unverified", step_dir, MANIFEST)
  return verified


def _shapes(tree: Any, root: str) -> dict[str, tuple[int, ...]]:
  """Path -> shape of the leaves under `root` (a tree, or orbax's metadata of one)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  paths = ((jax.tree_util.keystr(p, simple=True, separator="/"), x) for p, x in leaves)
  return {p: tuple(x.shape) for p, x in paths if p == root or p.startswith(f"{root}/")}


def _metadata(state_dir: pathlib.Path) -> dict[str, Any]:
  try:
    return dict(ocp.StandardCheckpointHandler().metadata(epath.Path(state_dir)))
  except Exception as e:  # noqa: BLE001 (orbax raises bare Exceptions for unreadable files)
    raise CorruptCheckpointError(f"{state_dir}: unreadable metadata ({_first_line(e)})") from None


def _check_fits(state_dir: pathlib.Path, saved: Any, target: Any, root: str = "params") -> None:
  """A checkpoint of another model is bad input, not damage: told apart before reading."""
  got, want = _shapes(saved, root), _shapes(target, root)
  if got != want:
    diff = sorted(set(got.items()) ^ set(want.items()))[:2]
    raise CheckpointError(f"{state_dir}: the params do not fit the model (e.g. {diff})")


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _agree(error: Exception | None, where: pathlib.Path) -> Exception | None:
  """Every process takes the same way: one process's failure to read is every one's."""
  if jax.process_count() == 1:
    return error
  failed = distributed.gather([error is not None])
  if error is None and failed.any():
    return CorruptCheckpointError(f"{where}: another process could not read it")
  return error


def _check_finite(tree: Any, where: pathlib.Path) -> None:
  if not bool(_all_finite(tree)):
    raise CorruptCheckpointError(f"{where}: holds non-finite (NaN or infinite) values")


@dataclasses.dataclass
class Restored:
  step: int
  state: Any
  data_state: dict[str, Any]


class Checkpointer:
  """Keeps the newest `keep` verified checkpoints of a run under `directory`."""

  def __init__(self, directory: str, keep: int):
    self.directory = os.path.abspath(directory)
    self.keep = keep
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(max_to_keep=None, enable_async_checkpointing=True),
      item_names=_ITEMS,
    )
    self._unsealed: list[int] = []  # Saved here, without a manifest yet.

  def _step_dir(self, step: int) -> pathlib.Path:
    return pathlib.Path(self.directory) / str(step)

  def latest_step(self) -> int | None:
    found = steps(self.directory)
    return found[0] if found else None

  def save(self, step: int, state: Any, data_state: dict[str, Any]) -> None:
    """Starts an asynchronous save of `state` and `data_state` as checkpoint `step` (after
    sealing the previous one); refuses a state that is not finite."""
    if not bool(_all_finite(state)):
      raise CheckpointError(f"{self._step_dir(step)}: not saved, the state is not finite")
    self._seal()
    self.manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
      ),
    )
    self._unsealed.append(step)

  def _seal(self) -> None:
    """Waits for the pending save; then process 0, once every process's files are final,
    writes their manifests and drops the verified steps beyond `keep`."""
    self.manager.wait_until_finished()
    unsealed, self._unsealed = self._unsealed, []
    if jax.process_index() != 0:
      return
    for step in unsealed:
      if self._step_dir(step).is_dir():
        write_manifest(self._step_dir(step))
    verified = [s for s in steps(self.directory) if (self._step_dir(s) / MANIFEST).is_file()]
    if len(verified) > self.keep:
      oldest_kept = verified[self.keep - 1]
      for step in steps(self.directory):
        if step < oldest_kept:
          shutil.rmtree(self._step_dir(step))

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores checkpoint `step` into the shapes and shardings of `abstract_state` (a tree of
    `jax.ShapeDtypeStruct` with shardings: any mesh). Damage: `CorruptCheckpointError`."""
    step_dir = self._step_dir(step)
    error, verified = None, False
    try:
      verified = _check_verified(step_dir)
      _check_fits(step_dir / "state", _metadata(step_dir / "state"), abstract_state)
      restored = self.manager.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
        ),
      )
    except CheckpointError as e:
      error = e
    except Exception as e:  # noqa: BLE001 (orbax raises bare Exceptions for damaged arrays)
      # Its files are intact (verified) and fit: then it is not damage but a bug or bad input.
      kind = CheckpointError if verified else CorruptCheckpointError
      error = kind(f"{step_dir}: cannot restore: {_first_line(e)}")
    error = _agree(error, step_dir)
    if error is not None:
      raise error
    _check_finite(restored["state"], step_dir)
    return restored["state"], restored["data"]

  def restore_latest(self, abstract_state: Any) -> Restored | None:
    """The newest good checkpoint (None if there is none at all); each damaged newer one is
    reported in one line and moved aside. Raises `CheckpointError` if every one is damaged."""
    found = steps(self.directory)
    for step in found:
      try:
        state, data_state = self.restore(step, abstract_state)
      except CorruptCheckpointError as e:
        log.warning("%s; moved to %s%s", e, step, self._move_aside(step))
        continue
      if step != found[0]:
        log.warning("going on from step %d, the newest good checkpoint", step)
      return Restored(step, state, data_state)
    if found:
      raise CheckpointError(
        f"{self.directory}: no good checkpoint left (steps {found} were damaged: moved aside)"
      )
    return None

  def _move_aside(self, step: int) -> str:
    """Renames a damaged step out of the way (process 0); returns its new suffix."""
    suffix, n = CORRUPT, 1
    while os.path.exists(f"{self._step_dir(step)}{suffix}"):
      n += 1
      suffix = f"{CORRUPT}-{n}"
    distributed.barrier(f"jaxtune_aside_{step}{suffix}")  # Every process named it first.
    if jax.process_index() == 0:
      os.rename(self._step_dir(step), f"{self._step_dir(step)}{suffix}")
    distributed.barrier(f"jaxtune_moved_{step}{suffix}")
    self.manager.reload()  # Orbax lists the steps once; this one is gone.
    return suffix

  def close(self) -> None:
    self._seal()
    self.manager.close()


def abstract(tree: Any, shardings: Any) -> Any:
  """`jax.ShapeDtypeStruct`s of `tree` carrying `shardings`: a restore target."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )


def _restore_params(directory: str, step: int, abstract_params: Any) -> Any:
  step_dir = pathlib.Path(directory).absolute() / str(step)
  path = step_dir / "state"
  if not path.is_dir():
    raise CheckpointError(f"{path}: no such checkpoint")
  verified = _check_verified(step_dir)
  tree = _metadata(path)
  if "params" not in tree:
    raise CheckpointError(f"{path}: not a jaxtune train state (no params)")
  _check_fits(path, tree, {"params": abstract_params})
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree)
  target["params"] = abstract_params
  try:
    params = ocp.StandardCheckpointer().restore(path, target)["params"]
  except Exception as e:  # noqa: BLE001 (orbax raises bare Exceptions for damaged arrays)
    kind = CheckpointError if verified else CorruptCheckpointError
    raise kind(f"{path}: cannot restore: {_first_line(e)}") from None
  _check_finite(params, step_dir)
  return params


def restore_params(directory: str, abstract_params: Any, step: int | None = None) -> Any:
  """The parameters of checkpoint `step` (default: the newest good one, with a warning for each
  damaged newer one) under `directory` (a run's `checkpoints/`), placed by the shardings of
  `abstract_params` and cast to its dtypes; the rest of the state is not kept."""
  if step is not None:
    return _restore_params(directory, step, abstract_params)
  found = steps(directory)
  if not found:
    raise CheckpointError(f"{directory}: no checkpoint found")
  for candidate in found:
    try:
      params = _restore_params(directory, candidate, abstract_params)
    except CorruptCheckpointError as e:
      log.warning("%s; trying the previous checkpoint", e)
      continue
    if candidate != found[0]:
      log.warning("loaded step %d, the newest good checkpoint of %s", candidate, directory)
    return params
  raise CheckpointError(f"{directory}: no good checkpoint (steps {found} are all damaged)")
