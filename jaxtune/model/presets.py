"""Published architectures as `ModelConfig` keyword arguments, selected by `model.preset`.

Parameter counts are checked in tests against the published figures with `jax.eval_shape`.
Plain data: this module imports nothing, so the config loader can read it cheaply. A preset is
applied over the `ModelConfig` defaults, so each one names every architectural key.
"""

_LLAMA = dict(mlp="swiglu", norm="rmsnorm", position="rope", tie_embeddings=False)

PRESETS: dict[str, dict] = {
  # Touvron et al. 2023, "Llama 2": 6,738,415,616 parameters.
  "llama2-7b": dict(
    _LLAMA,
    vocab_size=32000,
    dim=4096,
    num_layers=32,
    num_heads=32,
    num_kv_heads=None,
    mlp_dim=11008,
    max_seq_len=4096,
  ),
  # Meta Llama 3 8B: 8,030,261,248 parameters.
  "llama3-8b": dict(
    _LLAMA,
    vocab_size=128256,
    dim=4096,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    mlp_dim=14336,
    rope_theta=500000.0,
    max_seq_len=8192,
  ),
  # Jiang et al. 2023, "Mistral 7B" (v0.1): 7,241,732,096 parameters.
  "mistral-7b": dict(
    _LLAMA,
    vocab_size=32000,
    dim=4096,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    mlp_dim=14336,
    max_seq_len=32768,
  ),
  # Gemma Team 2024, "Gemma" 2B: 2,506,172,416 parameters; MQA, GeGLU, tied scaled embeddings.
  "gemma-2b": dict(
    vocab_size=256000,
    dim=2048,
    num_layers=18,
    num_heads=8,
    num_kv_heads=1,
    head_dim=256,
    mlp_dim=16384,
    mlp="geglu",
    norm="rmsnorm",
    norm_eps=1e-6,
    tie_embeddings=True,
    scale_embeddings=True,
    max_seq_len=8192,
  ),
  # Chowdhery et al. 2022, "PaLM" 8B (8.63B parameters): parallel block, MQA, SwiGLU,
  # bias-free LayerNorm, shared input/output embeddings with scaled logits.
  "palm-8b": dict(
    vocab_size=256000,
    dim=4096,
    num_layers=32,
    num_heads=16,
    num_kv_heads=1,
    head_dim=256,
    mlp_dim=16384,
    mlp="swiglu",
    norm="layernorm",
    parallel_block=True,
    tie_embeddings=True,
    scale_tied_logits=True,
    max_seq_len=2048,
  ),
  # Radford et al. 2019, GPT-2 small: 124,439,808 parameters; biases, learned positions.
  "gpt2": dict(
    vocab_size=50257,
    dim=768,
    num_layers=12,
    num_heads=12,
    num_kv_heads=None,
    mlp_dim=3072,
    mlp="gelu",
    norm="layernorm",
    use_bias=True,
    position="learned",
    max_seq_len=1024,
    tie_embeddings=True,
  ),
  # Karpathy's llama2.c stories260K (TinyStories): 260,032 weights, GQA with 4 KV heads.
  "stories260K": dict(
    _LLAMA,
    vocab_size=512,
    dim=64,
    num_layers=5,
    num_heads=8,
    num_kv_heads=4,
    mlp_dim=172,
    max_seq_len=512,
    tie_embeddings=True,
  ),
  # CPU-sized models for tests, examples and benchmarks.
  "tiny": dict(
    _LLAMA,
    vocab_size=512,
    dim=64,
    num_layers=2,
    num_heads=8,
    num_kv_heads=2,
    mlp_dim=128,
    max_seq_len=512,
  ),
  "small": dict(
    _LLAMA,
    vocab_size=32000,
    dim=512,
    num_layers=8,
    num_heads=8,
    num_kv_heads=2,
    mlp_dim=1408,
    max_seq_len=2048,
  ),
}
