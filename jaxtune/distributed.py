"""Multi-process runs: every process of a TPU pod slice, a SLURM job or a local emulated pod runs
the same command, and `initialize` joins them into one JAX runtime before any other JAX use.

Where the settings come from, first found wins: the `distributed` config section, then the
environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), then what
`jax.distributed.initialize` detects itself (Cloud TPU VM metadata, SLURM, Open MPI). With
`distributed.mode=auto` a run with none of them is a single process; `required` requires a
multi-process run and `disabled` never starts one. CPU processes exchange collectives through gloo,
so several processes on one machine form one mesh (JAX_NUM_CPU_DEVICES sets each one's devices).

Failure: the coordination service on process 0 watches every process's heartbeat. A process that
dies (killed, out of memory, its host lost) is declared lost after
`distributed.heartbeat_timeout_s`, and the service then terminates every other process with
"Terminating process because the JAX distributed service detected fatal errors ... The following
tasks are unhealthy (stopped sending heartbeats): <ids>"; if process 0 dies, the others stop at
once ("Either the leader task was preempted/died/restarted"). A process that fails with an error
waits for the others at the shutdown barrier for at most `distributed.shutdown_timeout_s`, after
which all stop. Those messages come from XLA (a process that aborts runs no more Python), so each
process logs here which one it is and the heartbeat timeout.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxtune.config import DistributedConfig
from jaxtune.errors import ConfigError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Process:
  """This process's place in the run."""

  index: int
  count: int


def _from_env(name: str) -> int | None:
  text = os.environ.get(name, "")
  if not text:
    return None
  if not text.isdigit():
    raise ConfigError(f"environment variable {name}={text!r} must be a non-negative integer")
  return int(text)


def settings(cfg: DistributedConfig) -> tuple[str | None, int | None, int | None]:
  """(coordinator_address, num_processes, process_id) from the config, else the environment;
  None where neither sets it (for JAX to detect)."""
  address = cfg.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  count = cfg.num_processes or _from_env("JAX_NUM_PROCESSES")
  index = cfg.process_id if cfg.process_id >= 0 else _from_env("JAX_PROCESS_ID")
  return address, count, index


def initialize(cfg: DistributedConfig) -> Process:
  """Joins the other processes of a multi-process run; call once, before any other JAX use."""
  if cfg.mode == "disabled":
    return Process(0, 1)
  if jax.distributed.is_initialized():  # A second verb in the same Python process.
    return Process(jax.process_index(), jax.process_count())
  address, count, index = settings(cfg)
  given = (address, count, index) != (None, None, None)
  if given:
    log.info(
      "joining a multi-process run as process %s of %s through %s (waiting up to %d s for the "
      "others)",
      "?" if index is None else index,
      "?" if count is None else count,
      address or "a detected coordinator",
      cfg.initialization_timeout_s,
    )
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(
      address,
      count,
      index,
      initialization_timeout=cfg.initialization_timeout_s,
      heartbeat_timeout_seconds=cfg.heartbeat_timeout_s,
      shutdown_timeout_seconds=cfg.shutdown_timeout_s,
    )
  except RuntimeError as e:  # JAX already started in this Python process (a notebook, a script).
    if type(e) is not RuntimeError:  # XLA's errors (a coordinator not reached) are subclasses.
      raise
    if given or cfg.mode == "required":
      raise ConfigError(
        "cannot join a multi-process run: JAX already started in this Python process; run "
        "jaxtune (or jaxtune.distributed.initialize) before any other JAX use"
      ) from None
    return Process(0, 1)  # It started as one process, and no run was asked to join.
  except ValueError as e:  # Settings missing and not detected, or out of range.
    if not given and cfg.mode == "auto":
      return Process(0, 1)  # No cluster around: the ordinary single-process run.
    raise ConfigError(
      f"cannot start a multi-process run: {e} Set distributed.coordinator_address, "
      "distributed.num_processes and distributed.process_id (or JAX_COORDINATOR_ADDRESS, "
      "JAX_NUM_PROCESSES, JAX_PROCESS_ID), or run where JAX detects them (Cloud TPU VM, SLURM)"
    ) from None
  process = Process(jax.process_index(), jax.process_count())
  log.info(
    "process %d of %d: %d local of %d devices (%s); if a process is lost, the others stop "
    "after %d s (distributed.heartbeat_timeout_s)",
    process.index,
    process.count,
    jax.local_device_count(),
    jax.device_count(),
    jax.default_backend(),
    cfg.heartbeat_timeout_s,
  )
  return process


def join(cfg: DistributedConfig) -> Process:
  """`initialize`, then quiets the other processes: only process 0 logs below WARNING. Every
  verb that runs a model calls this first, before any other JAX use."""
  process = initialize(cfg)
  if process.index:
    logging.getLogger().setLevel(logging.WARNING)
  return process


def gather(values: Sequence[int]) -> np.ndarray:
  """Every process's `values` on every process, as int64 [processes, len(values)]: how processes
  that each know only their own shards of the data agree on counts (one collective)."""
  local = np.asarray(values, np.int64)
  return np.asarray(multihost_utils.process_allgather(local)).reshape(jax.process_count(), -1)


def barrier(name: str) -> None:
  """Waits until every process gets here (nothing to wait for in a single process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
