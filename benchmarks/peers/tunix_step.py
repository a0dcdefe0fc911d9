"""One training step of the benchmark's Llama model in Google's tunix (run by the tunix
environment of `benchmarks/setup_peers.sh`; see `harness.py` for the arguments and output).

Used the way tunix's SFT recipes use it: its `Llama3` model (flax nnx), LoRA applied by
`qwix.apply_lora_to_model` on the same projections with the same rank and alpha, and the step of
its `PeftTrainer` (`jit_train_and_eval_step`: `nnx.value_and_grad` over the LoRA parameters
alone, or all parameters for full fine-tuning, then `nnx.Optimizer.update`) with its default loss,
on an optax chain of global-norm clipping and AdamW. The weights are redrawn from N(0, 0.02) like
the other frameworks' (tunix's own initializers leave the MLP at zero).
"""

from __future__ import annotations

import importlib.metadata

import harness
import jax
import jax.numpy as jnp
import numpy as np
import optax
import qwix
from flax import nnx
from tunix.models.llama3 import model as llama3
from tunix.sft import peft_trainer


def redraw(model: nnx.Module, seed: int) -> None:
  """Weights (every parameter of 2+ dims) from N(0, 0.02); norm scales stay at one."""
  params = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [
    0.02 * jax.random.normal(k, x.shape, x.dtype) if x.ndim >= 2 else x
    for k, x in zip(keys, leaves, strict=True)
  ]
  nnx.update(model, jax.tree.unflatten(treedef, leaves))


def main() -> None:
  cfg = harness.config()
  model = llama3.Llama3(
    llama3.ModelConfig(
      num_layers=cfg["layers"],
      vocab_size=cfg["vocab"],
      embed_dim=cfg["dim"],
      hidden_dim=cfg["mlp"],
      num_heads=cfg["heads"],
      head_dim=cfg["dim"] // cfg["heads"],
      num_kv_heads=cfg["kv_heads"],
      rope_theta=10_000,
      norm_eps=1e-5,
      weight_tying=False,
    ),
    rngs=nnx.Rngs(cfg["seed"]),
  )
  redraw(model, cfg["seed"])
  if cfg["mode"] == "lora":
    provider = qwix.LoraProvider(
      module_path=".*(" + "|".join(harness.PROJECTIONS[t] for t in cfg["lora_targets"]) + ")",
      rank=cfg["lora_rank"],
      alpha=cfg["lora_alpha"],
    )
    model = qwix.apply_lora_to_model(
      model, provider, rngs=nnx.Rngs(cfg["seed"]), **model.get_model_input()
    )
  optimizer = optax.chain(
    optax.clip_by_global_norm(cfg["clip_norm"]),
    optax.adamw(cfg["lr"], b1=0.9, b2=0.95, weight_decay=cfg["weight_decay"]),
  )
  trainer = peft_trainer.PeftTrainer(
    model,
    optimizer,
    peft_trainer.TrainingConfig(
      eval_every_n_steps=1_000_000, checkpoint_root_directory=None, max_steps=None
    ),
  )
  train_step, _ = trainer.jit_train_and_eval_step()
  b, t = cfg["batch"], cfg["seq"]
  ids = np.random.default_rng(cfg["seed"]).integers(0, cfg["vocab"], (b, t))
  causal_btt = jnp.tril(jnp.ones((t, t), bool))
  inputs = {
    "input_tokens": jnp.asarray(ids, jnp.int32),
    "input_mask": jnp.ones((b, t), bool),
    "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
    "attention_mask": jnp.broadcast_to(causal_btt, (b, t, t)),
  }
  n_trainable = sum(
    x.size
    for x in jax.tree.leaves(
      nnx.state(model, nnx.LoRAParam if cfg["mode"] == "lora" else nnx.Param)
    )
  )

  def step() -> float:
    loss, _, _ = train_step(inputs)
    return float(loss)

  info = {
    "framework": "tunix",
    "google-tunix": importlib.metadata.version("google-tunix"),
    "jax": jax.__version__,
    "flax": importlib.metadata.version("flax"),
    "qwix": importlib.metadata.version("qwix"),
    "n_params": sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))),
    "n_trainable": n_trainable,
  }
  harness.serve(cfg, step, info)


if __name__ == "__main__":
  main()
