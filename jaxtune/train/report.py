"""A run's step reports: the progress bar, metrics.jsonl and TensorBoard records with throughput
and MFU (against `train/peak.py`'s peak), and the checks of non-finite steps (stop, or count the
skipped ones)."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import jax
from tqdm import tqdm

from jaxtune.config import Config
from jaxtune.errors import TrainingError
from jaxtune.train import metrics
from jaxtune.train import peak as peak_lib

log = logging.getLogger(__name__)


def make(cfg: Config, lr: Any, n_params: int, steps: int, first: int) -> Reporter:
  """The run's Reporter (process 0 shows and writes), from step `first` of `steps`; `lr`: step ->
  learning rate; `n_params`: the model's, for its FLOPs per token."""
  chief = jax.process_index() == 0
  return Reporter(
    cfg,
    lr=lr,
    writer=metrics.Writer(cfg.train.output_dir, enabled=chief),
    bar=tqdm(total=steps, initial=first, unit="step", disable=not chief, mininterval=1.0),
    flops_per_token=metrics.flops_per_token(cfg.model, n_params, cfg.data.max_length),
    peak=peak_lib.peak(cfg.model.dtype, cfg.train.peak_flops) if chief else None,
  )


def check_finite(step: int, step_metrics: dict[str, jax.Array], cfg: Config) -> None:
  if not bool(step_metrics["update_finite"]):  # Applied in place: no state to skip back to.
    raise TrainingError(
      f"step {step}: the update made the parameters non-finite (loss "
      f"{float(step_metrics['loss'])}, gradient norm {float(step_metrics['grad_norm'])}); "
      "check train.learning_rate. No checkpoint holds them, and the run stops whatever "
      "train.nonfinite says"
    )
  if not bool(step_metrics["finite"]) and cfg.train.nonfinite == "stop":
    raise TrainingError(
      f"step {step}: non-finite loss ({float(step_metrics['loss'])}) or gradient "
      f"norm ({float(step_metrics['grad_norm'])}); the step was not applied and "
      "no checkpoint holds it. Set train.nonfinite=skip to skip such steps"
    )


def check_skipped(summary: dict[str, Any]) -> None:
  """With `train.nonfinite=skip`, a few skipped steps are a warning; half or more of the run's
  steps skipped is an error (its checkpoints are saved, but it barely trained)."""
  skipped, ran = summary["skipped_steps"], summary["steps"] - summary["start_step"]
  if not skipped:
    return
  message = f"{skipped} of the {ran} steps run were skipped: non-finite loss or gradient"
  if 2 * skipped >= ran:
    raise TrainingError(f"{message}; check train.learning_rate and the data")
  log.warning(message)


# What every step reports besides the objective's metrics (`step.make_train_step`).
_STEP_INTERNALS = ("loss", "grad_norm", "finite", "update_finite", "tokens", "supervised_tokens")


@dataclasses.dataclass
class Reporter:
  """Reports each step's metrics (progress bar, metrics.jsonl, TensorBoard) and counts the real
  (non-padding) tokens of the global batches trained on since it started, as the steps count
  them (each process builds only its part of a batch)."""

  cfg: Config
  lr: Any  # step -> learning rate
  writer: metrics.Writer
  bar: Any  # tqdm
  flops_per_token: float
  peak: peak_lib.Peak | None  # Of all the devices together.
  t0: float = dataclasses.field(default_factory=time.perf_counter)
  tokens: int = 0
  skipped: int = 0  # Steps not applied (non-finite), with train.nonfinite=skip.
  warned_mfu: bool = False

  def tokens_per_s(self) -> float:
    return self.tokens / (time.perf_counter() - self.t0)

  def __call__(self, step: int, step_metrics: dict[str, jax.Array]) -> None:
    check_finite(step, step_metrics, self.cfg)
    values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
    self.tokens += int(values.get("tokens", 0))
    self.skipped += not values["finite"]
    bar = self.bar
    if bar.disable:  # Not process 0: nothing to show or write.
      return
    if not values["finite"]:
      log.warning("step %d: non-finite loss or gradient; step skipped", step)
    bar.update(step - bar.n)
    if step % self.cfg.train.log_every and step != bar.total:
      return
    record = {
      "loss": values["loss"],
      "grad_norm": values["grad_norm"],
      "lr": float(self.lr(step - 1)),
      "tokens_per_s": self.tokens_per_s(),
      "step_time_s": (time.perf_counter() - self.t0) / max(bar.n - bar.initial, 1),
    }
    # The objective's own metrics (a DPO step's rewards, margin, accuracy and KL; SFT's nll).
    record.update({k: v for k, v in values.items() if k not in _STEP_INTERNALS})
    if self.peak:
      record["mfu"] = record["tokens_per_s"] * self.flops_per_token / self.peak.flops
      if record["mfu"] > 1 and not self.warned_mfu:
        self.warned_mfu = True
        log.warning(
          "MFU %.0f%% is above 100%%: the peak (%s) is too low; set train.peak_flops, or delete "
          "the peak cache (%s) to measure it again on an idle machine",
          100 * record["mfu"],
          self.peak.describe(),
          peak_lib.cache_path(),
        )
    self.writer.write(step, record)
    bar.set_postfix(
      loss=f"{record['loss']:.3f}",
      lr=f"{record['lr']:.1e}",
      gnorm=f"{record['grad_norm']:.2f}",
      tok_s=f"{record['tokens_per_s']:.0f}",
      **({"mfu": f"{100 * record['mfu']:.1f}%"} if self.peak else {}),
    )

  def close(self) -> None:
    self.bar.close()
    self.writer.close()
