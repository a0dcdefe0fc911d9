"""Training FLOP counts (MFU and HFU) against a hand count of a small model, and the FLOPs that
XLA counts in the compiled train step of a one-layer model (a scanned stack is counted once)."""

import dataclasses
import io

import jax
import jax.numpy as jnp
import pytest
from tqdm import tqdm

from jaxtune import config, sharding
from jaxtune.config import PeftConfig
from jaxtune.config_model import ModelConfig
from jaxtune.model import transformer
from jaxtune.peft import methods, partition
from jaxtune.train import loop, metrics, report
from jaxtune.train import peak as peak_lib

# D=64, L=2, N=8 query heads of Q=8, K=2 KV heads, F=128, V=512, untied; rows of T=32.
SMALL = config.load(None, ["model.preset=tiny"]).model
T = 32
# By hand: a layer has q 64*64, k and v 64*16 each, o 64*64, gate/up/down 64*128 each and two
# norms of 64: 34,944; two layers, the embedding table and the output layer (512*64 each) and the
# final norm: 135,488. The matmul parameters N are all but the embedding lookup: 102,720.
TOTAL, N = 135_488, 102_720
LHQT = 2 * 8 * 8 * T  # 4,096.
# LoRA rank 8 on q (A 64x8, B 8x64) and v (A 64x8, B 8x16): 1,664 per layer.
LORA = 2 * (64 * 8 + 8 * 64 + 64 * 8 + 8 * 16)


def _count(model_cfg: ModelConfig, peft: PeftConfig | None = None) -> int:
  model = methods.model(model_cfg, peft or PeftConfig())
  return partition.count(jax.eval_shape(transformer.init_fn(model), jax.random.key(0)))


def test_hand_count_matches_the_model():
  assert _count(SMALL) == TOTAL
  assert _count(SMALL, PeftConfig(method="lora")) == TOTAL + LORA
  assert metrics.matmul_params(SMALL, TOTAL) == N


def test_model_flops_are_palms():
  assert metrics.flops_per_token(SMALL, TOTAL, T) == 6 * N + 12 * LHQT


def test_hardware_flops():
  # Rows of 256 make 4 query blocks of 64; a query's products cover the keys up to its block's
  # end: 64 * (64 + 128 + 192 + 256) = 40,960 of the 65,536 pairs, 160 keys per query.
  t = 256
  lhqs = 2 * 8 * 8 * 160
  # Every parameter trained, nothing recomputed: the model's matmuls, and the attention's 2
  # products forward and 5 backward (its scores recomputed).
  assert metrics.hardware_flops_per_token(SMALL, TOTAL, t) == 6 * N + 14 * lhqs
  minimal = dataclasses.replace(SMALL, remat="minimal")
  assert metrics.hardware_flops_per_token(minimal, TOTAL, t) == 6 * N + 14 * lhqs
  # Full remat runs the layers' forward again (2 per parameter of the layers: all matmul
  # parameters but the 512*64 output layer) and the attention's forward products (4*LHQS).
  full = dataclasses.replace(SMALL, remat="full")
  assert (
    metrics.hardware_flops_per_token(full, TOTAL, t)
    == 6 * N + 14 * lhqs + 2 * (N - 512 * 64) + 4 * lhqs
  )
  # dots and dots_no_batch keep the weight products and recompute the attention's forward.
  for remat in ("dots", "dots_no_batch"):
    cfg = dataclasses.replace(SMALL, remat=remat)
    assert metrics.hardware_flops_per_token(cfg, TOTAL, t) == 6 * N + 18 * lhqs
  # LoRA: forward and activation gradients through every matmul (4 per parameter, adapters
  # included), weight gradients for the adapters alone.
  got = metrics.hardware_flops_per_token(SMALL, TOTAL + LORA, t, frozen_params=TOTAL)
  assert got == 4 * (N + LORA) + 2 * LORA + 14 * lhqs
  # A row of one block (T = 32 < 64): the whole square, T keys per query.
  assert metrics.hardware_flops_per_token(SMALL, TOTAL, T) == 6 * N + 14 * LHQT


@pytest.mark.parametrize("method", ["none", "lora"])
def test_hardware_flops_match_xla_count(method):
  """The compiled step's FLOPs (matmuls, plus the few elementwise ones) per token, for one layer
  so that XLA's count of the scanned stack is the whole count: within 3%."""
  cfg = config.load(
    None,
    [
      "model.dim=256",
      "model.num_layers=1",
      "model.num_heads=8",
      "model.num_kv_heads=2",
      "model.mlp_dim=1024",
      "model.max_seq_len=128",
      "mesh.data=1",
      f"peft.method={method}",
      "peft.lora_targets=[q,k,v,o,gate,up,down]",
    ],
  )
  rows, length = 4, 128
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  t = loop.build(cfg, mesh, steps=1)
  batch = {
    k: jax.ShapeDtypeStruct((rows, length), dtype, sharding=t.batch_sharding)
    for k, dtype in [
      ("inputs", jnp.int32),
      ("targets", jnp.int32),
      ("weights", jnp.float32),
      ("segment_ids", jnp.int32),
      ("positions", jnp.int32),
    ]
  }
  counted = t.train_step.lower(t.state, t.frozen, batch).compile().cost_analysis()["flops"]
  frozen = t.n_params - t.n_trainable
  want = metrics.hardware_flops_per_token(cfg.model, t.n_params, length, frozen)
  assert counted / (rows * length) == pytest.approx(want, rel=0.03)


def test_an_mfu_above_one_warns_once_naming_the_peak(tmp_path, caplog):
  """A step faster than the peak proves the peak too low (measured on a busy machine): the
  report says so once, naming the peak and how to measure it again."""
  cfg = config.load(None, [f"train.output_dir={tmp_path}", "train.log_every=1"])
  too_low = peak_lib.Peak(1e3, "numpy", "float32", {"numpy": 1e3}, "measured at load 9.0")
  reporter = report.Reporter(
    cfg,
    lr=lambda step: 1e-3,
    writer=metrics.Writer(str(tmp_path), enabled=True),
    bar=tqdm(total=3, disable=False, file=io.StringIO()),
    flops_per_token=1e6,
    peak=too_low,
  )
  step = {k: jnp.float32(1.0) for k in ("loss", "grad_norm", "finite", "update_finite")}
  with caplog.at_level("WARNING", logger=report.__name__):
    for i in (1, 2, 3):
      reporter(i, {**step, "tokens": jnp.float32(1000)})
  reporter.close()
  warnings = [r.getMessage() for r in caplog.records if "above 100%" in r.getMessage()]
  assert len(warnings) == 1 and "measured at load 9.0" in warnings[0], warnings
