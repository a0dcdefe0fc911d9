"""One training step of the benchmark's Llama model in Google's MaxText (run by the maxtext
environment of `benchmarks/setup_peers.sh`; see `harness.py` for the arguments and output).

Used the way MaxText's pre-training trainer (`maxtext.trainers.pre_train.train`) uses it: the
configuration from its `base.yml` with the benchmark's shape as overrides (its `llama2` decoder
block: GQA, RoPE, SwiGLU, RMSNorm, untied output layer), `train_utils.setup_train_loop` to build
the model, AdamW (with global-norm clipping) and the sharded state, and its `train_step` jitted
by `train_utils.jit_train_and_eval_step`, called on the benchmark's fixed batch. float32
weights, activations in the configuration's `dtype` (float32 unless told; MaxText's default is
bfloat16), no dropout, and its
fastest rematerialization policy (`minimal_with_context`: MaxText's default, `full`, recomputes
the whole block in the backward pass, which jaxtune and the other peers do not do).

LoRA: MaxText trains LoRA only through its SFT trainer, which is tunix's `PeftTrainer` over
qwix adapters (the tunix runner's step); its pre-training step has none, so this runner refuses
`"mode": "lora"`.
"""

from __future__ import annotations

import importlib.metadata
import os
import tempfile

import harness

os.environ.setdefault(
  "JAX_PLATFORMS", "cpu"
)  # Else MaxText's [tpu] extra's libtpu probes for a TPU.

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from flax.core.spmd import logical_axis_rules  # noqa: E402
from maxtext.configs import pyconfig  # noqa: E402
from maxtext.trainers.pre_train import train  # noqa: E402
from maxtext.utils import sharding, train_utils  # noqa: E402

BASE_YML = os.path.join(os.path.dirname(pyconfig.__file__), "base.yml")


def overrides(cfg: dict, output_dir: str) -> list[str]:
  """The benchmark's run as MaxText's `key=value` overrides of `base.yml`."""
  return [
    "run_name=bench",
    f"base_output_directory={output_dir}",
    # Its persistent compilation cache (default ~/jax_cache) would skip the compile of a rerun:
    # each run compiles afresh, as the other frameworks do.
    f"jax_cache_dir={os.path.join(output_dir, 'jax_cache')}",
    "hardware=cpu",
    "skip_jax_distributed_system=true",
    "enable_checkpointing=false",
    "enable_goodput_recording=false",
    "monitor_goodput=false",
    "dataset_type=synthetic",
    "decoder_block=llama2",
    f"base_emb_dim={cfg['dim']}",
    f"base_num_query_heads={cfg['heads']}",
    f"base_num_kv_heads={cfg['kv_heads']}",
    f"head_dim={cfg['dim'] // cfg['heads']}",
    f"base_mlp_dim={cfg['mlp']}",
    f"base_num_decoder_layers={cfg['layers']}",
    f"vocab_size={cfg['vocab']}",
    f"max_target_length={cfg['seq']}",
    f"per_device_batch_size={cfg['batch']}",
    "logits_via_embedding=false",
    "normalization_layer_epsilon=1e-5",
    "rope_max_timescale=10000",
    f"dtype={cfg.get('dtype', 'float32')}",
    "weight_dtype=float32",
    "enable_dropout=false",
    "attention=dot_product",
    "remat_policy=minimal_with_context",
    "scan_layers=true",
    "opt_type=adamw",
    "adam_b1=0.9",
    "adam_b2=0.95",
    f"adam_weight_decay={cfg['weight_decay']}",
    f"gradient_clipping_threshold={cfg['clip_norm']}",
    f"learning_rate={cfg['lr']}",
    "warmup_steps_fraction=0",  # Else a tenth of `steps` of warm-up: no learning in the run.
    "steps=1000000",
    f"init_weights_seed={cfg['seed']}",
  ]


def batch(cfg: dict) -> dict[str, np.ndarray]:
  """The fixed batch in MaxText's layout: every token real (one segment), shifted targets."""
  b, t = cfg["batch"], cfg["seq"]
  tokens = np.random.default_rng(cfg["seed"]).integers(0, cfg["vocab"], (b, t + 1), np.int32)
  positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
  ones = np.ones((b, t), np.int32)
  return {
    "inputs": tokens[:, :-1],
    "inputs_position": positions,
    "inputs_segmentation": ones,
    "targets": tokens[:, 1:],
    "targets_position": positions,
    "targets_segmentation": ones,
  }


def main() -> None:
  cfg = harness.config()
  if cfg["mode"] != "full":
    raise SystemExit(
      "maxtext: no LoRA in MaxText's pre-training step (its LoRA is tunix's PeftTrainer, "
      "benchmarked as the tunix peer)"
    )
  jax.config.update("jax_default_prng_impl", "unsafe_rbg")  # As MaxText's train.initialize.
  with tempfile.TemporaryDirectory(prefix="maxtext-bench-") as output_dir:
    run(cfg, output_dir)


def run(cfg: dict, output_dir: str) -> None:
  """Builds MaxText's state and jitted step for the run, and serves it."""
  config = pyconfig.initialize(["maxtext_step", BASE_YML, *overrides(cfg, output_dir)])
  jax.config.update("jax_use_shardy_partitioner", config.shardy)
  (_, _, state_shardings, _, mesh, *_, state) = train_utils.setup_train_loop(config, None)
  model, state = nnx.split(state)
  params_shardings, state_shardings = sharding.maybe_update_params_sharding_with_opt(
    config, state_shardings
  )
  train_step, _ = train_utils.jit_train_and_eval_step(
    config,
    model,
    mesh,
    state,
    state_shardings,
    train.train_step,
    params_shardings=params_shardings,
  )
  with jax.set_mesh(mesh):
    data = jax.device_put(batch(cfg), sharding.get_input_data_sharding(config, mesh))
  weights = nnx.state(nnx.merge(model, state).model, nnx.Param)
  n_params = sum(x.size for x in jax.tree.leaves(weights))
  current = {"state": state}

  def step() -> float:
    with jax.set_mesh(mesh), logical_axis_rules(config.logical_axis_rules):
      current["state"], metrics = train_step(current["state"], data)
    return float(metrics["scalar"]["learning/loss"])

  info = {
    "framework": "maxtext",
    "maxtext": importlib.metadata.version("maxtext"),
    "jax": jax.__version__,
    "flax": importlib.metadata.version("flax"),
    "n_params": n_params,
    "n_trainable": n_params,
  }
  harness.serve(cfg, step, info)


if __name__ == "__main__":
  main()
