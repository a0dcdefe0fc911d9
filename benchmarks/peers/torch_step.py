"""One training step of the benchmark's Llama model in PyTorch `transformers` (run by the torch
environment of `benchmarks/setup_peers.sh`; see `harness.py` for the arguments and output).

Used the way Hugging Face's Trainer uses it by default: `LlamaForCausalLM` (SDPA attention) on
the CPU with one intra-op thread per CPU it may use (`threads`), `loss.backward()`,
gradients clipped to global norm `clip_norm`, and `torch.optim.AdamW(fused=True)` (the Trainer's
default optimizer for torch >= 2.8). LoRA through `peft` on the same projections, with the same
rank and alpha. `"dtype": "bfloat16"` runs the forward pass under `torch.autocast` in bfloat16
(the Trainer's `bf16=True`): float32 weights, bfloat16 products.
"""

from __future__ import annotations

import harness
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM


def main() -> None:
  cfg = harness.config()
  torch.set_num_threads(cfg["threads"])
  torch.manual_seed(cfg["seed"])
  model = LlamaForCausalLM(
    LlamaConfig(
      vocab_size=cfg["vocab"],
      hidden_size=cfg["dim"],
      intermediate_size=cfg["mlp"],
      num_hidden_layers=cfg["layers"],
      num_attention_heads=cfg["heads"],
      num_key_value_heads=cfg["kv_heads"],
      max_position_embeddings=cfg["seq"],
      tie_word_embeddings=False,
      torch_dtype=torch.float32,
    )
  )
  info = {"framework": "transformers", "torch": torch.__version__}
  info["transformers"] = transformers.__version__
  if cfg["mode"] == "lora":
    import peft

    lora = peft.LoraConfig(
      r=cfg["lora_rank"],
      lora_alpha=cfg["lora_alpha"],
      target_modules=[harness.PROJECTIONS[t] for t in cfg["lora_targets"]],
    )
    model = peft.get_peft_model(model, lora)
    info["peft"] = peft.__version__
  model.train()
  trainable = [p for p in model.parameters() if p.requires_grad]
  info["n_params"] = sum(p.numel() for p in model.parameters())
  info["n_trainable"] = sum(p.numel() for p in trainable)
  info["attention"] = model.config._attn_implementation
  optimizer = torch.optim.AdamW(
    trainable, lr=cfg["lr"], betas=(0.9, 0.95), weight_decay=cfg["weight_decay"], fused=True
  )
  generator = torch.Generator().manual_seed(cfg["seed"])
  ids = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=generator)

  dtype = cfg.get("dtype", "float32")
  info["dtype"] = dtype

  def step() -> float:
    with torch.autocast("cpu", torch.bfloat16, enabled=dtype == "bfloat16"):
      loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, cfg["clip_norm"])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()

  harness.serve(cfg, step, info)


if __name__ == "__main__":
  main()
