"""Many completions per prompt (RLHF rollouts, best-of-K): jaxtune's shared prefill against
Hugging Face `generate(num_return_sequences=K)`, in one run.

One random Llama-style model (GQA) is made by jaxtune and written as a Hugging Face folder
(`convert.hf.save_hf`), so both frameworks run the same weights. P prompts of T random tokens,
K samples each, `new` tokens per sample (temperature 1, no stop id: every sample runs its full
length), float32, on this machine's CPUs:

- `jaxtune shared`: `generate.generate_samples(num_samples=K)`: each prompt prefilled once, its
  KV cache repeated for its K samples, P*K rows decoded together;
- `jaxtune copies`: `generate.generate` on the P*K prompts (each prompt K times): K prefills per
  prompt, the same decoding (and, by construction, the same tokens);
- `transformers`: `model.generate(do_sample=True, num_return_sequences=K)`, which expands the
  inputs K times before its prefill (SDPA attention, its dynamic KV cache), torch with one
  thread per CPU.

Each method runs once first (jaxtune compiles then), then `runs` timed runs, the methods taking
turns run by run so a shared machine's load falls on all alike. Tokens/s = P * K * new / the
median wall time of a whole call (prefill and decoding).

  python benchmarks/sampling.py [--quick] [--runs N] [--samples K]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import common
import flax.linen as nn
import jax
import numpy as np

from jaxtune import generate
from jaxtune.config_model import ModelConfig
from jaxtune.convert import hf
from jaxtune.model import transformer

MODEL = dict(
  vocab_size=2048, dim=512, num_layers=8, num_heads=8, num_kv_heads=2, mlp_dim=1408,
  max_seq_len=1024, tie_embeddings=False,
)  # fmt: skip
QUICK_MODEL = dict(MODEL, vocab_size=256, dim=64, num_layers=2, mlp_dim=128, max_seq_len=128)
SIZES = dict(prompts=4, prompt=256, new=64)
QUICK_SIZES = dict(prompts=2, prompt=32, new=8)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="a tiny model, to check it works")
  parser.add_argument("--runs", type=int, default=3, help="timed runs per method")
  parser.add_argument("--samples", type=int, default=8, help="completions per prompt (K)")
  args = parser.parse_args()
  import torch  # The test extra's; imported after JAX has started.
  import transformers

  torch.set_num_threads(os.cpu_count())
  model_kw, sizes = (QUICK_MODEL, QUICK_SIZES) if args.quick else (MODEL, SIZES)
  k = args.samples
  cfg = ModelConfig(**model_kw)
  model = transformer.Transformer(cfg)
  params = nn.meta.unbox(jax.jit(transformer.init_fn(model))(jax.random.key(0)))["params"]
  folder = tempfile.mkdtemp(prefix="sampling-hf-")
  hf.save_hf(cfg, params, folder)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(
    folder, torch_dtype=torch.float32, attn_implementation="sdpa"
  ).eval()
  p, t, new = sizes["prompts"], sizes["prompt"], sizes["new"]
  prompts = np.random.default_rng(0).integers(1, cfg.vocab_size, (p, t)).tolist()
  sampling = generate.Sampling(max_new_tokens=new, temperature=1.0)
  rows = p * k

  def shared():
    out = generate.generate_samples(
      model, params, prompts, sampling, num_samples=k, batch_size=rows
    )
    assert all(len(c.ids) == new for per in out for c in per)

  def copies():
    repeated = [q for q in prompts for _ in range(k)]
    out = generate.generate(model, params, repeated, sampling, batch_size=rows)
    assert all(len(c.ids) == new for c in out)

  inputs = torch.tensor(prompts)

  def hugging_face():
    with torch.no_grad():
      out = hf_model.generate(
        inputs,
        attention_mask=torch.ones_like(inputs),
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        num_return_sequences=k,
        max_new_tokens=new,
        min_new_tokens=new,
        pad_token_id=0,
      )
    assert out.shape == (rows, t + new), out.shape

  methods = {"jaxtune shared": shared, "jaxtune copies": copies, "transformers": hugging_face}
  first, times = {}, {name: [] for name in methods}
  for name, fn in methods.items():
    t0 = time.perf_counter()
    fn()
    first[name] = time.perf_counter() - t0
  for _ in range(args.runs):
    for name, fn in methods.items():
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  tokens = rows * new
  base = statistics.median(times["transformers"])
  table = []
  for name in methods:
    median = statistics.median(times[name])
    table.append({
      "method": name,
      "tokens_per_s": tokens / median,
      "vs_transformers": base / median,
      "call_s": median,
      "first_call_s": first[name],
      "runs_s": times[name],
    })  # fmt: skip
    print(f"{name}: {tokens / median:.1f} tokens/s (x{base / median:.2f} transformers)")
  shape = ", ".join(f"{a} {b}" for a, b in model_kw.items())
  title = f"Sampling {k} completions per prompt ({'quick' if args.quick else 'full'})"
  markdown = "\n\n".join([
    f"# {title}",
    f"Model: {shape}; float32; random weights, the same in both frameworks. {p} prompts of {t} "
    f"tokens, {k} samples each, {new} new tokens per sample (temperature 1, no stop id); "
    f"{args.runs} timed runs per method, interleaved; median. torch "
    f"{torch.__version__}, transformers {transformers.__version__}, jax {jax.__version__}.",
    common.markdown_table(
      table, ["method", "tokens_per_s", "vs_transformers", "call_s", "first_call_s"]
    ),
  ])  # fmt: skip
  name = "sampling_quick" if args.quick else "sampling"
  path = common.write(
    name, {"model": model_kw, "sizes": sizes, "samples": k, "rows": table}, markdown
  )
  print(markdown)
  print(f"written: {path}")


if __name__ == "__main__":
  main()
