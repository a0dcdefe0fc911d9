"""LoRA fine-tunes leave jaxtune: adapters in Hugging Face PEFT's format, loaded by `peft` on a
`transformers` base model, and merged weights loaded by `transformers` alone; both give
jaxtune's logits."""

import dataclasses
import pathlib
import warnings

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
import peft as hf_peft_lib
import pytest
import torch
import transformers
from flax import traverse_util
from test_hf import TOKENS_BT, TOLERANCE, _hf_model, _torch_logits, _transformers_warnings

import jaxtune
from jaxtune.config import PeftConfig
from jaxtune.convert import export, hf, hf_peft
from jaxtune.errors import CheckpointError
from jaxtune.model import transformer
from jaxtune.model.adapters import NONE
from jaxtune.peft import methods, partition

LORA = PeftConfig(
  method="lora",
  lora_rank=4,
  lora_alpha=8.0,
  lora_targets=("q", "k", "v", "o", "gate", "up", "down"),
)


def _finetuned(base: jaxtune.api.Model) -> jaxtune.api.Model:
  """`base` with random LoRA adapters on every projection (B not zero)."""
  model = methods.model(base.config, LORA)
  adapters, _ = partition.split(
    nn.meta.unbox(transformer.init_fn(model)(jax.random.key(0))["params"]), methods.trains(LORA)
  )
  keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(adapters))))
  adapters = jax.tree.map(lambda x: 0.2 * jax.random.normal(next(keys), x.shape), adapters)
  return dataclasses.replace(
    base, params=partition.combine(adapters, base.params), adapters=methods.adapters(LORA)
  )


@pytest.mark.parametrize("case", ["llama-gqa", "qwen2", "gemma"])
def test_adapters_load_in_peft_and_merged_weights_in_transformers(case, tmp_path):
  _hf_model(case).save_pretrained(tmp_path / "base")
  tuned = _finetuned(jaxtune.load(tmp_path / "base"))
  expected = np.asarray(tuned.logits(TOKENS_BT))
  assert not np.allclose(expected, jaxtune.load(tmp_path / "base").logits(TOKENS_BT), atol=1e-2)

  hf_peft.save_adapter(
    tuned.config, tuned.adapters, tuned.params, tmp_path / "adapter", str(tmp_path / "base")
  )
  base = transformers.AutoModelForCausalLM.from_pretrained(
    tmp_path / "base", attn_implementation="eager"
  )
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with_adapter = hf_peft_lib.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
  assert not [w for w in caught if "key" in str(w.message).lower()], [
    str(w.message) for w in caught
  ]
  np.testing.assert_allclose(_torch_logits(with_adapter, TOKENS_BT), expected, atol=TOLERANCE)

  merged = tuned.merged()
  hf.save_hf(merged.config, merged.params, tmp_path / "merged")
  with _transformers_warnings() as records:
    plain = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / "merged", attn_implementation="eager"
    )
  assert not records, [r.getMessage() for r in records]
  np.testing.assert_allclose(_torch_logits(plain.eval(), TOKENS_BT), expected, atol=TOLERANCE)


def test_a_lora_run_exports_merged_and_as_adapters(tmp_path):
  """A real LoRA run (random base from its seed): `convert --to hf` merges it, `--to peft`
  writes its adapters; both give the logits `jaxtune.load` gives for the run."""
  from jaxtune.train import loop

  cfg = jaxtune.config.load(
    str(pathlib.Path(__file__).parents[1] / "configs" / "lora.yaml"),
    [
      "model.dim=32", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
      "model.mlp_dim=64", "data.synthetic_examples=64", "data.max_length=96",
      "train.steps=3", "train.batch_size=8", "train.learning_rate=1e-2", "train.warmup_steps=0",
      f"train.output_dir={tmp_path / 'run'}", "data.eval_size=4", "train.held_out_prompts=2",
    ],
  )  # fmt: skip
  loop.run(cfg)
  step = tmp_path / "run" / "checkpoints" / "3" / "state"
  saved = ocp.StandardCheckpointer().metadata(step).item_metadata.tree["params"]
  assert {path[-1] for path in traverse_util.flatten_dict(saved)} == {"lora_a", "lora_b"}
  run = jaxtune.load(tmp_path / "run")
  assert run.adapters == methods.adapters(cfg.peft) and run.adapters.lora_rank > 0  # LoRA.
  tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (2, 12))
  expected = np.asarray(run.logits(tokens))

  export.convert(tmp_path / "run", tmp_path / "hf", "hf")
  with torch.no_grad():
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
  np.testing.assert_allclose(_torch_logits(merged, tokens), expected, atol=TOLERANCE)

  export.convert(tmp_path / "run", tmp_path / "adapter", "peft")
  base = run.merged()
  base_only = dataclasses.replace(
    base, params=partition.base(run.params), adapters=NONE
  )  # The run's frozen base, written for transformers.
  hf.save_hf(base_only.config, base_only.params, tmp_path / "base")
  with_adapter = hf_peft_lib.PeftModel.from_pretrained(
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter"
  ).eval()
  np.testing.assert_allclose(_torch_logits(with_adapter, tokens), expected, atol=TOLERANCE)

  with pytest.raises(CheckpointError, match="no adapters"):
    export.convert(tmp_path / "hf", tmp_path / "none", "peft")
