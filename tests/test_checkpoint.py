"""Orbax checkpoints: a state saved on one mesh restores onto another, values intact; damage to
the latest checkpoint (of every kind we know) falls back to the previous one, in one line; a
non-finite state is never saved nor loaded."""

import dataclasses
import logging
import pathlib
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from subprocesses import TINY_RUN

import jaxtune
from jaxtune import checkpoint, config, sharding
from jaxtune.checkpoint import MANIFEST
from jaxtune.config import MeshConfig
from jaxtune.config_model import ModelConfig
from jaxtune.errors import CheckpointError, ConfigError, CorruptCheckpointError, TrainingError
from jaxtune.model import transformer
from jaxtune.train import loop, objective, sft


def test_restore_onto_a_different_mesh_shape(tmp_path):
  cfg = ModelConfig(vocab_size=256, dim=32, num_layers=2, num_heads=8, num_kv_heads=2, mlp_dim=64)
  init = transformer.init_fn(transformer.Transformer(cfg))
  saved_mesh = sharding.make_mesh(MeshConfig(data=2, model=4))
  saved = sharding.init_sharded(init, jax.random.key(3), saved_mesh, "fsdp")
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), keep=1)
  ckpt.save(7, saved.variables, {"epoch": 1, "index": 5, "batches": 9})
  ckpt.close()

  other_mesh = sharding.make_mesh(MeshConfig(data=8, model=1))
  target = sharding.init_sharded(init, jax.random.key(0), other_mesh, "tp")
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), keep=1)
  assert ckpt.latest_step() == 7
  state, data_state = ckpt.restore(7, checkpoint.abstract(target.variables, target.shardings))
  ckpt.close()
  assert data_state == {"epoch": 1, "index": 5, "batches": 9}
  for got, want, want_sharding in zip(
    jax.tree.leaves(state),
    jax.tree.leaves(saved.variables),
    jax.tree.leaves(target.shardings),
    strict=True,
  ):
    np.testing.assert_array_equal(got, want)
    assert got.sharding.is_equivalent_to(want_sharding, got.ndim)


def test_params_restore_from_a_run_directory(tmp_path):
  cfg = ModelConfig(vocab_size=256, dim=32, num_layers=2, num_heads=8, mlp_dim=64)
  init = transformer.init_fn(transformer.Transformer(cfg))
  mesh = sharding.make_mesh(MeshConfig(data=4, model=2))
  sharded = sharding.init_sharded(init, jax.random.key(1), mesh, "tp")
  state = {"params": sharded.variables["params"], "step": np.int32(3)}
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), keep=1)
  ckpt.save(3, state, {})
  ckpt.close()
  params = sharded.variables["params"]
  abstract = checkpoint.abstract(params, sharded.shardings["params"])
  restored = checkpoint.restore_params(str(tmp_path / "checkpoints"), abstract)
  jax.tree.map(np.testing.assert_array_equal, restored, params)


# Damage: checksums, fallback to the newest good checkpoint, non-finite states.


def test_retention_always_keeps_a_verified_checkpoint(tmp_path):
  """keep=1: the last verified step stays until a newer one is verified (saves are async)."""
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=1)
  for step in (1, 2, 3):
    ckpt.save(step, {"params": {"w": np.full(4, step, np.float32)}}, {})
    verified = [s for s in checkpoint.steps(tmp_path) if (tmp_path / str(s) / MANIFEST).is_file()]
    assert verified == ([] if step == 1 else [step - 1]), (step, verified)
  ckpt.close()
  assert checkpoint.steps(tmp_path) == [3] and checkpoint.verify(tmp_path / "3")


def test_a_non_finite_state_is_never_saved(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=1)
  with pytest.raises(CheckpointError, match="not saved, the state is not finite"):
    ckpt.save(1, {"params": {"w": np.array([1.0, np.inf], np.float32)}}, {})
  ckpt.close()
  assert checkpoint.steps(tmp_path) == []


def _config(output_dir: pathlib.Path, *overrides: str) -> config.Config:
  return config.load(
    None,
    [
      *TINY_RUN,
      "train.steps=3",
      "train.checkpoint_every=1",
      "train.keep_checkpoints=3",
      "train.batch_size=8",
      "train.eval_every=100",
      "train.warmup_steps=0",
      f"train.output_dir={output_dir}",
      *overrides,
    ],
  )


@dataclasses.dataclass
class Trained:
  run: pathlib.Path  # Verified checkpoints 1, 2, 3; never damaged (tests damage copies).
  cfg: config.Config
  abstract: Any  # The train state's restore target.

  def copy(self, tmp_path: pathlib.Path) -> pathlib.Path:
    shutil.copytree(self.run, tmp_path / "run")
    return tmp_path / "run"

  def params(self, step: int) -> Any:
    return checkpoint.restore_params(str(self.run / "checkpoints"), self.abstract.params, step)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trained:
  """One tiny run, made once: each test damages a copy of it."""
  run = tmp_path_factory.mktemp("trained") / "run"
  cfg = _config(run)
  loop.run(cfg)
  mesh = sharding.make_mesh(cfg.mesh)
  t = loop.build(cfg, mesh, cfg.train.steps, shapes_only=True)
  assert checkpoint.steps(run / "checkpoints") == [3, 2, 1]
  assert all(checkpoint.verify(run / "checkpoints" / str(s)) for s in (1, 2, 3))
  return Trained(run, cfg, checkpoint.abstract(t.state, t.state_sharding))


def _array_file(step_dir: pathlib.Path) -> pathlib.Path:
  """The largest array data file of a step (it holds parameters)."""
  files = (step_dir / "state" / "ocdbt.process_0" / "d").iterdir()
  return max(files, key=lambda p: p.stat().st_size)


def _flip(path: pathlib.Path) -> None:
  data = bytearray(path.read_bytes())
  for i in range(len(data) // 3, min(len(data) // 3 + 64, len(data))):
    data[i] ^= 0xFF
  path.write_bytes(bytes(data))


def _truncate(path: pathlib.Path) -> None:
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _zero(path: pathlib.Path) -> None:
  path.write_bytes(bytes(path.stat().st_size))


def _unreadable(path: pathlib.Path) -> None:
  """A file that no one can read, root included (chmod 000 does not stop root): a folder where
  the file was, so reading it fails with an OSError."""
  path.unlink()
  path.mkdir()


# Damage to the latest checkpoint's folder -> what it does.
DAMAGE = {
  "flipped_bytes": lambda d: _flip(_array_file(d)),
  "deleted_array": lambda d: _array_file(d).unlink(),
  "truncated_array": lambda d: _truncate(_array_file(d)),
  "zeroed_array": lambda d: _zero(_array_file(d)),
  "no_manifest_ocdbt": lambda d: (d / "state" / "manifest.ocdbt").unlink(),
  "no_process_manifest_ocdbt": lambda d: (d / "state/ocdbt.process_0/manifest.ocdbt").unlink(),
  "no_metadata": lambda d: (d / "state" / "_METADATA").unlink(),
  "flipped_data_state": lambda d: _flip(next((d / "data").glob("*"))),
  "unreadable_array": lambda d: _unreadable(_array_file(d)),
  # Without the checksums (a run stopped before its save was checked), truncation still shows.
  "unverified_truncated": lambda d: ((d / MANIFEST).unlink(), _truncate(_array_file(d))),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(
  trained, damage, tmp_path, caplog
):
  checkpoints = trained.copy(tmp_path) / "checkpoints"
  DAMAGE[damage](checkpoints / "3")
  before = sorted(p.name for p in checkpoints.iterdir())

  # jaxtune.load and the verbs: the previous checkpoint, with a warning; nothing moved.
  caplog.set_level(logging.WARNING)
  params = checkpoint.restore_params(str(checkpoints), trained.abstract.params)
  jax.tree.map(np.testing.assert_array_equal, params, trained.params(2))
  assert sorted(p.name for p in checkpoints.iterdir()) == before
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any(str(checkpoints / "3") in w for w in warnings), warnings
  assert all("\n" not in w for w in warnings), warnings
  with pytest.raises(CorruptCheckpointError, match=f"{checkpoints / '3'}"):
    checkpoint.restore_params(str(checkpoints), trained.abstract.params, step=3)

  # Resuming: the same, and the damaged checkpoint is moved aside, kept.
  caplog.clear()
  ckpt = checkpoint.Checkpointer(str(checkpoints), keep=3)
  restored = ckpt.restore_latest(trained.abstract)
  ckpt.close()
  assert restored.step == 2
  jax.tree.map(np.testing.assert_array_equal, restored.state.params, trained.params(2))
  assert checkpoint.steps(checkpoints) == [2, 1]
  assert (checkpoints / "3.corrupt").is_dir()
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any("moved to 3.corrupt" in w for w in warnings), warnings
  assert any("going on from step 2" in w for w in warnings), warnings


def test_resume_from_flipped_bytes_trains_on_from_the_previous_checkpoint(trained, tmp_path):
  """The reported case: flipped bytes loaded as a corrupt state that NaN'd two steps later."""
  run = trained.copy(tmp_path)
  _flip(_array_file(run / "checkpoints" / "3"))
  cfg = _config(run, "train.resume=true", "train.steps=4")
  summary = loop.run(cfg)
  assert summary["start_step"] == 2 and summary["skipped_steps"] == 0
  assert np.isfinite(summary["eval_loss_end"])
  assert checkpoint.steps(run / "checkpoints") == [4, 3, 2]
  assert (run / "checkpoints" / "3.corrupt").is_dir()
  assert checkpoint.verify(run / "checkpoints" / "3") and checkpoint.verify(
    run / "checkpoints" / "4"
  )


def test_a_run_without_a_final_checkpoint_keeps_the_earlier_ones(trained, tmp_path):
  """train.final_checkpoint=false (a run measured by its metrics alone): the run trains and is
  measured to its last step, and writes no checkpoint of it; those before it stay."""
  run = trained.copy(tmp_path)
  cfg = _config(run, "train.resume=true", "train.steps=4", "train.final_checkpoint=false")
  summary = loop.run(cfg)
  assert summary["start_step"] == 3 and np.isfinite(summary["eval_loss_end"])
  assert checkpoint.steps(run / "checkpoints") == [3, 2, 1]


def test_no_good_checkpoint_left_is_one_clear_error(trained, tmp_path):
  checkpoints = trained.copy(tmp_path) / "checkpoints"
  for step in (1, 2, 3):
    _zero(_array_file(checkpoints / str(step)))
  with pytest.raises(CheckpointError, match="no good checkpoint") as e:
    checkpoint.restore_params(str(checkpoints), trained.abstract.params)
  assert "\n" not in str(e.value)
  ckpt = checkpoint.Checkpointer(str(checkpoints), keep=3)
  with pytest.raises(CheckpointError, match="no good checkpoint left"):
    ckpt.restore_latest(trained.abstract)
  ckpt.close()
  assert sorted(p.name for p in checkpoints.iterdir()) == ["1.corrupt", "2.corrupt", "3.corrupt"]


def test_non_finite_params_are_refused_by_load(trained, tmp_path):
  """A checkpoint holding NaN (as an earlier jaxtune could write): `jaxtune.load` names it."""
  run = trained.copy(tmp_path)
  with ocp.StandardCheckpointer() as raw:
    state = raw.restore(run / "checkpoints" / "3" / "state")
    embedding = np.array(state["params"]["embed"]["embedding"])
    embedding[0, 0] = np.nan
    state["params"]["embed"]["embedding"] = embedding
    raw.save(run / "checkpoints" / "4" / "state", state)
  with pytest.raises(
    CorruptCheckpointError, match=f"{run / 'checkpoints' / '4'}: holds non-finite"
  ):
    jaxtune.load(run / "checkpoints" / "4")
  model = jaxtune.load(run)  # The run: the newest good checkpoint, with a warning.
  jax.tree.map(np.testing.assert_array_equal, model.params, trained.params(3))


def test_an_overflowing_learning_rate_never_leaves_a_non_finite_checkpoint(tmp_path):
  """lr 1e39 (past config validation, which refuses it) overflows the first update, which is
  applied in place: even with train.nonfinite=skip the run stops there with an error that says
  so, and no checkpoint is written (before, checkpoints/1 held NaN parameters)."""
  cfg = _config(tmp_path / "run", "train.nonfinite=skip")
  cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, learning_rate=1e39))
  with pytest.raises(TrainingError, match="step 1: the update made the parameters non-finite"):
    loop.run(cfg)
  assert checkpoint.steps(tmp_path / "run" / "checkpoints") == []


class _NanLoss(sft.SFT):
  """Cross-entropy times NaN: every step's loss and gradient are non-finite."""

  def loss(self, params, batch, rng):
    loss, metrics = super().loss(params, batch, rng)
    return loss * jnp.nan, metrics


def test_a_run_that_skips_most_of_its_steps_ends_with_an_error(trained, tmp_path, monkeypatch):
  """train.nonfinite=skip with every step non-finite: the checkpoints hold the initial state
  (nothing applied, all finite), and the run ends with an error that counts the skipped steps
  (before, it exited 0 quietly)."""
  monkeypatch.setitem(objective.OBJECTIVES, "nan", lambda model, train: _NanLoss(model))
  cfg = _config(tmp_path / "run", "train.nonfinite=skip", "train.objective=nan")
  with pytest.raises(TrainingError, match="3 of the 3 steps run were skipped"):
    loop.run(cfg)
  checkpoints = tmp_path / "run" / "checkpoints"
  assert checkpoint.steps(checkpoints) == [3, 2, 1]
  first = checkpoint.restore_params(str(checkpoints), trained.abstract.params, 1)
  last = checkpoint.restore_params(str(checkpoints), trained.abstract.params, 3)
  jax.tree.map(np.testing.assert_array_equal, first, last)  # Nothing was applied.


def test_learning_rates_that_do_not_fit_float32_are_config_errors():
  for value in ("1e39", ".inf", ".nan"):  # (NaN is not positive: said so first.)
    with pytest.raises(ConfigError, match="does not fit the param|must be (positive|a number)"):
      config.load(None, [f"train.learning_rate={value}"])
