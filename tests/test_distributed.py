"""Multi-process runs as a user starts them: processes on localhost joined by `jax.distributed`
(2 processes x 4 CPU devices, through `launch/local_pod.sh` or by hand) against one process with
8 devices; per-process data; the same batches on every mesh; a lost process; a restart on
another mesh."""

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from subprocesses import JAXTUNE, TINY_RUN, Background

from jaxtune import config, distributed
from jaxtune.data import pipeline
from jaxtune.errors import ConfigError
from jaxtune.train import loop

ROOT = pathlib.Path(__file__).parents[1]
STEPS = 6
RUN = [
  f"train.steps={STEPS}",
  "train.log_every=1",
  "train.eval_every=100",
  "train.checkpoint_every=2",
  "train.batch_size=8",
  "train.seed=3",
  "train.schedule=constant",  # Runs of different lengths share a schedule.
  "train.warmup_steps=0",
  "train.neftune_alpha=5",  # Noise drawn on sharded arrays, identical on any mesh.
  *TINY_RUN,
  "train.held_out_prompts=0",  # No held-out answers to decode at the end.
  "distributed.heartbeat_timeout_s=10",
  "distributed.shutdown_timeout_s=30",
]
MESH = ["mesh.data=4", "mesh.model=2", "mesh.strategy=fsdp"]  # Weights sharded across processes.
HEARTBEAT_S = 10
MORE = f"train.steps={STEPS + 2}"  # For the runs that go on past a 2-process run's end.


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices: int, **extra: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS" and not k.startswith("JAX_")}
  env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices), PYTHONUNBUFFERED="1")
  env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "true"  # Compile time dominates at this size.
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
  return {**env, **extra}


def _process_env(port: int, index: int, count: int = 2) -> dict[str, str]:
  return _env(
    4,
    JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
    JAX_NUM_PROCESSES=str(count),
    JAX_PROCESS_ID=str(index),
  )


def _train(*overrides: str) -> list[str]:
  return [*JAXTUNE, "train", *RUN, *overrides]


# Run in each of 2 processes: for three meshes, the rows this process holds, the data positions it
# read, its rows of a few batches, and the global batches assembled from both processes' rows.
_DATA_SCRIPT = """
import sys
import jax
import numpy as np
from jax.experimental import multihost_utils
from jaxtune import config, distributed, sharding
from jaxtune.data import pipeline

out, steps, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
cfg = config.load(None, overrides)
process = distributed.initialize(cfg.distributed)
shape = (cfg.train.batch_size, cfg.data.max_length)
for data_axis in (4, 8, 1):
  mesh = sharding.make_mesh(config.MeshConfig(data=data_axis, model=-1))
  batch_sharding = sharding.logical_sharding(
    mesh, tuple(sharding.RULE_PRESETS["tp"].items()), ("act_batch", "act_seq")
  )
  rows = sharding.batch_rows(mesh, cfg.train.batch_size)
  data = pipeline.load(cfg.data, cfg.train.seed, rows)
  batches = pipeline.training_batches(data, cfg, rows)
  local = [next(batches) for _ in range(steps)]
  gathered = [
    multihost_utils.process_allgather(
      jax.make_array_from_process_local_data(batch_sharding, b.inputs, shape), tiled=True
    )
    for b in local
  ]
  np.savez(
    f"{out}/data{data_axis}_process{process.index}.npz",
    rows=rows.mine,
    positions=data.positions,
    records=data.stats.records,
    inputs=np.stack([b.inputs for b in local]),
    gathered=np.stack(gathered),
  )
"""
_DATA_STEPS = 3
_DATA = [  # Real data, with a given tokenizer: each process reads only its rows' records.
  "train.batch_size=8",
  "train.seed=3",
  "data.max_length=512",
  "data.eval_size=16",
]


class _Pod:
  """The runs, started together when the first test needs one so that they share the cores:
  A: `local_pod.sh 2 4 train` (2 processes x 4 devices, STEPS steps); R: the same on 1 process x
  8 devices and the same mesh, for 2 steps more; O: the same on 1 device; K: 2 processes started
  by hand, one of them killed (`kill`); D: 2 processes that write their data rows
  (`_DATA_SCRIPT`); and B, started when A is done (`restart`): A's run continued by 1 process on
  another mesh (another data axis) up to R's end."""

  def __init__(self, root: pathlib.Path, data_dir: pathlib.Path):
    self.root = root
    self.dirs = {name: root / name for name in ("A", "R", "O", "K", "D", "B")}
    self.dirs["D"].mkdir()
    launcher = _env(4, PORT=str(_free_port()), JAXTUNE=f"{sys.executable} -m jaxtune.cli")
    self.A = Background(
      [str(ROOT / "launch" / "local_pod.sh"), "2", "4", *_train(*MESH)[3:], self._out("A")],
      launcher,
      root / "A.log",
    )
    self.R = Background(_train(*MESH, MORE, self._out("R")), _env(8), root / "R.log")
    self.O = Background(_train(self._out("O")), _env(1), root / "O.log")
    port = _free_port()
    self.K = [
      Background(_train(*MESH, self._out("K")), _process_env(port, i), root / f"K{i}.log")
      for i in range(2)
    ]
    port = _free_port()
    data_args = [str(self.dirs["D"]), str(_DATA_STEPS), *_DATA, *_data_files(data_dir)]
    self.D = [
      Background(
        [sys.executable, "-c", _DATA_SCRIPT, *data_args], _process_env(port, i), root / f"D{i}.log"
      )
      for i in range(2)
    ]
    self._killed: tuple[float, int, str] | None = None
    self.B: Background | None = None

  def _out(self, name: str) -> str:
    return f"train.output_dir={self.dirs[name]}"

  def processes(self) -> list[Background]:
    return [self.A, self.R, self.O, *self.K, *self.D, *([self.B] if self.B else [])]

  def kill(self) -> tuple[float, int, str]:
    """Kills K's process 1 once training has started (process 0 wrote the held-out loss at step
    0; next comes the first step); returns (seconds until process 0 exited, its status, its
    output)."""
    if self._killed is None:
      metrics = self.dirs["K"] / "metrics.jsonl"
      deadline = time.monotonic() + 240
      while not (metrics.is_file() and metrics.read_text()):
        for p in self.K:
          assert p.process.poll() is None, p.output()[-3000:]
        assert time.monotonic() < deadline, "training did not start within 240 s"
        time.sleep(0.01)
      self.K[1].process.send_signal(signal.SIGKILL)
      killed = time.monotonic()
      code, output = self.K[0].finish(timeout=120)
      self._killed = (time.monotonic() - killed, code, output)
    return self._killed

  def restart(self) -> Background:
    """A copy of A's finished run, continued by 1 process with 4 devices on a 2 x 2 mesh with
    the `tp` rules up to R's end (A's and R's mesh is 4 x 2: the batches must not change)."""
    if self.B is None:
      code, output = self.A.finish()
      assert code == 0, output[-3000:]
      shutil.copytree(self.dirs["A"], self.dirs["B"])
      overrides = ["mesh.data=2", "mesh.model=2", MORE, "train.resume=true", self._out("B")]
      self.B = Background(_train(*overrides), _env(4), self.root / "B.log")
    return self.B


def _data_files(data_dir: pathlib.Path) -> list[str]:
  return [
    f"data.path={data_dir / 'gsm8k/train.jsonl'}",
    f"data.tokenizer={data_dir / 'tokenizers/llama2c/tokenizer.model'}",
  ]


@pytest.fixture(scope="module")
def pod(tmp_path_factory, data_dir):
  runs = _Pod(tmp_path_factory.mktemp("pod"), data_dir)
  yield runs
  for p in runs.processes():
    p.kill()


def _steps(checkpoints: pathlib.Path) -> list[int]:
  """Complete checkpoint steps (orbax renames a step's temporary folder when it is complete)."""
  if not checkpoints.is_dir():
    return []
  return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit() and p.is_dir())


def _records(run: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _losses(run: pathlib.Path) -> dict[int, float]:
  """Step -> training loss; each step is written once (by process 0 only)."""
  steps = [r["step"] for r in _records(run) if "loss" in r]
  assert len(steps) == len(set(steps)), steps
  return {r["step"]: r["loss"] for r in _records(run) if "loss" in r}


def _params(run: pathlib.Path, step: int):
  """The parameters of checkpoint `step`, as numpy arrays (whatever mesh wrote them)."""
  path = run / "checkpoints" / str(step) / "state"
  with ocp.StandardCheckpointer() as checkpointer:
    tree = checkpointer.metadata(path).item_metadata.tree
    target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree)
    return checkpointer.restore(path, target)["params"]


def _assert_params_close(a, b) -> None:
  # Not bit-equal: gloo sums across processes in another order than XLA within one process.
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)


# The kill test comes first: the others wait for runs that share the cores with K.


def test_a_killed_process_stops_the_other_with_a_message(pod):
  seconds, code, output = pod.kill()
  assert code != 0, output[-3000:]
  # The coordination service declares process 1 lost after the heartbeat timeout.
  assert seconds < HEARTBEAT_S + 50, f"process 0 stopped {seconds:.0f} s after the kill"
  assert "joining a multi-process run as process 0 of 2" in output
  assert "another task died" in output, output[-3000:]
  assert re.search(r"stopped sending heartbeats\):\s*1\b", output), output[-3000:]


def test_each_process_reads_its_own_rows_which_together_are_the_single_process_data(pod, data_dir):
  for p in pod.D:
    code, output = p.finish()
    assert code == 0, output[-3000:]
  cfg = config.load(None, [*_DATA, *_data_files(data_dir)])
  whole = pipeline.load(cfg.data, cfg.train.seed)  # One process reads everything.
  assert len(whole.train) == 7473 - 16
  single = pipeline.training_batches(whole, cfg)  # The batches, whatever the mesh.
  want = np.stack([next(single).inputs for _ in range(_DATA_STEPS)])
  halves = [[0, 1, 2, 3], [4, 5, 6, 7]]
  for data_axis, mine in ((4, halves), (8, halves), (1, [list(range(8))] * 2)):
    parts = [np.load(pod.dirs["D"] / f"data{data_axis}_process{i}.npz") for i in range(2)]
    assert [p["rows"].tolist() for p in parts] == mine, data_axis
    positions = [set(p["positions"].tolist()) for p in parts]
    if data_axis > 1:  # Disjoint records, read by one process each, that make up the data.
      assert not positions[0] & positions[1]
      assert positions[0] | positions[1] == set(whole.positions.tolist())
      assert sum(int(p["records"]) for p in parts) == 7473 - 16  # Records read, held-out apart.
    else:  # The data axis does not span the processes: both hold all rows.
      assert positions[0] == positions[1] == set(whole.positions.tolist())
    for p, rows in zip(parts, mine, strict=True):  # Its rows of the batches, and the whole batches.
      np.testing.assert_array_equal(p["inputs"], want[:, rows])
      np.testing.assert_array_equal(p["gathered"], want)
  assert not np.array_equal(want[:, :4], want[:, 4:])  # Not vacuous: the halves differ.


def test_two_processes_train_as_one_process_with_the_same_mesh(pod):
  code, output = pod.A.finish()
  assert code == 0, output[-3000:]
  reference_code, reference_output = pod.R.finish()
  assert reference_code == 0, reference_output[-3000:]
  losses, reference = _losses(pod.dirs["A"]), _losses(pod.dirs["R"])
  assert sorted(losses) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([losses[s] for s in losses], [reference[s] for s in losses], 1e-5)
  held_out = [r["eval_loss"] for r in _records(pod.dirs["A"]) if "eval_loss" in r]
  assert held_out[-1] < held_out[0] - 0.1, held_out  # Not vacuous: it trained.
  _assert_params_close(_params(pod.dirs["A"], STEPS), _params(pod.dirs["R"], STEPS))
  # Only process 0 logs, shows progress and writes files; process 1's lines carry "[1] ".
  others = [line for line in output.splitlines() if line.startswith("[1] ")]
  assert any("process 1 of 2: 4 local of 8 devices (cpu)" in line for line in others), output
  assert not [line for line in others if " INFO jaxtune.train" in line or "step/s" in line]
  assert "model: " in output and "step/s" in output


def test_every_mesh_trains_on_the_same_batches(pod, tmp_path):
  """The same run on 1 device, on 1 x 8 (fsdp: the weights sharded 8 ways; held-out losses between
  steps), 2 x 4 and 8 x 1 meshes (in this process), and on 2 processes x 4 devices (A, 4 x 2):
  the same losses at every step."""
  for run in (pod.A, pod.O):
    code, output = run.finish()
    assert code == 0, output[-3000:]
  losses = {"2 processes x 4 devices": _losses(pod.dirs["A"]), "1 device": _losses(pod.dirs["O"])}
  for data, model, extra in (
    (1, 8, ["mesh.strategy=fsdp", "train.eval_every=2"]),
    (2, 4, []),
    (8, 1, []),
  ):
    output_dir = tmp_path / f"{data}x{model}"
    mesh = [f"mesh.data={data}", f"mesh.model={model}", *extra]
    loop.run(config.load(None, [*RUN, *mesh, f"train.output_dir={output_dir}"]))
    losses[f"{data} x {model}"] = _losses(output_dir)
  held_out = [r["eval_loss"] for r in _records(tmp_path / "1x8") if "eval_loss" in r]
  assert len(held_out) == 4 and all(np.isfinite(held_out)), held_out  # Start, 2, 4, end.
  reference = losses["1 device"]
  assert sorted(reference) == list(range(1, STEPS + 1))
  assert len(set(reference.values())) == STEPS  # Not vacuous: every step has its own batch.
  for name, got in losses.items():
    assert sorted(got) == sorted(reference), name
    np.testing.assert_allclose(
      [got[s] for s in reference], list(reference.values()), rtol=0, atol=1e-5, err_msg=name
    )


def test_a_checkpoint_of_two_processes_continues_on_one_process_and_another_mesh(pod):
  code, output = pod.restart().finish()
  assert code == 0, output[-3000:]
  assert f"resumed from step {STEPS}" in output
  assert "mesh {'data': 2, 'model': 2}" in output
  reference_code, reference_output = pod.R.finish()
  assert reference_code == 0, reference_output[-3000:]
  losses, reference = _losses(pod.dirs["B"]), _losses(pod.dirs["R"])
  assert sorted(losses) == list(range(1, STEPS + 3))  # A's steps, then 2 more.
  # On a data axis of 2, not A's 4, B goes on with the batches R trains on.
  np.testing.assert_allclose([losses[s] for s in losses], [reference[s] for s in losses], 1e-5)
  # The restored parameters: the held-out loss that A ended with, on the new mesh.
  resumed_eval = [r["eval_loss"] for r in _records(pod.dirs["B"]) if "eval_loss" in r]
  assert resumed_eval[-2] == pytest.approx(resumed_eval[-3], rel=1e-5)  # B's first, A's last.
  _assert_params_close(_params(pod.dirs["B"], STEPS + 2), _params(pod.dirs["R"], STEPS + 2))


def test_local_pod_stops_every_process_when_one_fails(tmp_path):
  result = subprocess.run(
    [str(ROOT / "launch" / "local_pod.sh"), "2", "4", "train", "model.dim=-64"],
    env=_env(4, JAXTUNE=f"{sys.executable} -m jaxtune.cli"),
    capture_output=True,
    text=True,
    timeout=120,
    cwd=tmp_path,
  )
  assert result.returncode == 2, result.stderr
  lines = result.stderr.splitlines()
  error = "jaxtune train: error: model.dim=-64 must be positive"
  assert any(x.endswith(error) for x in lines), result.stderr  # "[1] " before process 1's.
  assert any(re.fullmatch(r"local_pod: process [01] exited with status 2; .*", x) for x in lines)


def test_local_pod_usage():
  result = subprocess.run(
    [str(ROOT / "launch" / "local_pod.sh"), "2"], capture_output=True, text=True, timeout=30
  )
  assert result.returncode == 2
  assert "Usage: launch/local_pod.sh N M VERB" in result.stderr


def test_settings_come_from_the_config_then_the_environment(monkeypatch):
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(name, raising=False)
  assert distributed.settings(config.DistributedConfig()) == (None, None, None)
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAX_PROCESS_ID", "0")  # 0 is a process id, not "unset".
  assert distributed.settings(config.DistributedConfig()) == ("10.0.0.1:1234", 4, 0)
  cfg = config.load(
    None,
    [
      "distributed.coordinator_address=host:99",
      "distributed.num_processes=8",
      "distributed.process_id=7",
    ],
  ).distributed
  assert distributed.settings(cfg) == ("host:99", 8, 7)
  monkeypatch.setenv("JAX_NUM_PROCESSES", "four")
  with pytest.raises(ConfigError, match="JAX_NUM_PROCESSES='four' must be a non-negative integer"):
    distributed.settings(config.DistributedConfig())


@pytest.mark.parametrize(
  "overrides, message",
  [
    (["distributed.coordinator_address=10.0.0.1"], "must be host:port"),
    (["distributed.process_id=-2"], "distributed.process_id=-2 must be -1 or an index"),
    (["distributed.heartbeat_timeout_s=0"], "distributed.heartbeat_timeout_s=0 must be positive"),
    (["distributed.mode=maybe"], "distributed.mode='maybe' (from the command line) must be one of"),
    (
      ["distributed.num_processes=2", "distributed.process_id=2"],
      "distributed.process_id=2 must be below distributed.num_processes=2",
    ),
  ],
)
def test_bad_distributed_settings_name_the_key(overrides, message):
  with pytest.raises(ConfigError, match=re.escape(message)):
    config.load(None, overrides)


def test_after_jax_started_a_verb_runs_as_one_process_or_says_why_it_cannot_join(monkeypatch):
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(name, raising=False)
  jax.device_count()  # This test process has started JAX, as a notebook would have.
  assert distributed.initialize(config.DistributedConfig()) == distributed.Process(0, 1)
  cfg = config.load(
    None,
    [
      "distributed.coordinator_address=localhost:1",
      "distributed.num_processes=2",
      "distributed.process_id=0",
    ],
  ).distributed
  with pytest.raises(ConfigError, match="JAX already started in this Python process"):
    distributed.initialize(cfg)


def test_required_mode_without_settings_is_one_clear_line(tmp_path):
  result = subprocess.run(
    _train("distributed.mode=required"),
    env=_env(1),
    capture_output=True,
    text=True,
    timeout=120,
    cwd=tmp_path,
  )
  assert result.returncode == 2, result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("jaxtune train: error: cannot start a multi-process run: "), last
  assert "JAX_COORDINATOR_ADDRESS" in last, last
