"""llama2.c checkpoints ("legacy v0" `.bin`), and their tokenizers (`tok*.bin`, read by
`jaxtune.data.llama2c_tokenizer`) as the SentencePiece models they were exported from.

Model file: 7 little-endian int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
seq_len; a negative vocab_size means a separate output layer), then float32 arrays with matrices
stored [out, in]. RoPE is interleaved there; q/k rows are permuted to jaxtune's rotate-half layout.

Tokenizer: llama2.c's `export_tokenizer` wrote a SentencePiece BPE model's pieces and scores, with
"▁" as a space and BOS/EOS as "\n<s>\n"/"\n</s>\n". `to_sentencepiece` writes them back as a
SentencePiece ModelProto (byte fallback, identity normalizer, dummy prefix), which SentencePiece
and transformers' LlamaTokenizer encode exactly as llama2.c does: BPE by piece score, where a
piece's id order is its score order.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
from sentencepiece import sentencepiece_model_pb2

from jaxtune.config_model import ModelConfig
from jaxtune.data import llama2c_tokenizer
from jaxtune.data import tokenizer as tokenizer_lib
from jaxtune.errors import CheckpointError
from jaxtune.model.attention import interleaved_to_half

_HEADER = struct.Struct("<7i")


def load_model(path: str) -> tuple[ModelConfig, dict[str, Any]]:
  """Reads a llama2.c model file into a ModelConfig and a `{'params': ...}` tree of numpy arrays."""
  with open(path, "rb") as f:
    blob = f.read()
  if len(blob) < _HEADER.size:
    raise CheckpointError(f"{path}: {len(blob)} bytes is too short for a llama2.c header")
  if blob[:4] == b"ak42":
    raise CheckpointError(f"{path}: llama2.c versioned ('ak42') files are not supported; export v0")
  dim, hidden, layers, heads, kv_heads, vocab, seq_len = _HEADER.unpack_from(blob)
  if min(dim, hidden, layers, heads, kv_heads, seq_len) <= 0 or vocab == 0 or dim % heads:
    raise CheckpointError(f"{path}: implausible llama2.c header {_HEADER.unpack_from(blob)}")
  cfg = ModelConfig(
    vocab_size=abs(vocab),
    dim=dim,
    num_layers=layers,
    num_heads=heads,
    num_kv_heads=kv_heads,
    mlp_dim=hidden,
    max_seq_len=seq_len,
    tie_embeddings=vocab > 0,
    norm="rmsnorm",
    mlp="swiglu",
    position="rope",
    norm_eps=1e-5,
  )
  v, h, nl, f = abs(vocab), dim // heads, layers, hidden
  shapes = {
    "tok_emb": (v, dim),
    "rms_att": (nl, dim),
    "wq": (nl, heads * h, dim),
    "wk": (nl, kv_heads * h, dim),
    "wv": (nl, kv_heads * h, dim),
    "wo": (nl, dim, heads * h),
    "rms_ffn": (nl, dim),
    "w1": (nl, f, dim),
    "w2": (nl, dim, f),
    "w3": (nl, f, dim),
    "rms_final": (dim,),
    "freq_cis": (2, seq_len, h // 2),
  }
  if vocab < 0:
    shapes["wcls"] = (v, dim)
  expected = _HEADER.size + 4 * sum(int(np.prod(s)) for s in shapes.values())
  if len(blob) != expected:
    raise CheckpointError(
      f"{path}: {len(blob)} bytes, but its header {_HEADER.unpack_from(blob)} implies "
      f"{expected}; the file is truncated or not a llama2.c v0 checkpoint"
    )
  w, offset = {}, _HEADER.size
  for name, shape in shapes.items():
    count = int(np.prod(shape))
    w[name] = np.frombuffer(blob, "<f4", count, offset).reshape(shape)
    offset += 4 * count

  perm = interleaved_to_half(h)

  def heads_in(w_lod, n, permute):  # [L, n*H, D] -> [L, D, n, H]
    w_lnhd = w_lod.reshape(nl, n, h, dim)
    return (w_lnhd[:, :, perm] if permute else w_lnhd).transpose(0, 3, 1, 2)

  layer = {
    "attn_norm": {"scale": w["rms_att"]},
    "attn": {
      "q": {"kernel": heads_in(w["wq"], heads, True)},
      "k": {"kernel": heads_in(w["wk"], kv_heads, True)},
      "v": {"kernel": heads_in(w["wv"], kv_heads, False)},
      "o": {"kernel": w["wo"].reshape(nl, dim, heads, h).transpose(0, 2, 3, 1)},
    },
    "mlp_norm": {"scale": w["rms_ffn"]},
    "mlp": {
      "gate": {"kernel": w["w1"].transpose(0, 2, 1)},
      "up": {"kernel": w["w3"].transpose(0, 2, 1)},
      "down": {"kernel": w["w2"].transpose(0, 2, 1)},
    },
  }
  params = {
    "embed": {"embedding": w["tok_emb"]},
    "layers": layer,
    "final_norm": {"scale": w["rms_final"]},
  }
  if vocab < 0:
    params["lm_head"] = {"embedding": w["wcls"]}
  params = _copy_tree(params)
  return cfg, {"params": params}


def _copy_tree(tree: dict) -> dict:
  return {
    k: _copy_tree(v) if isinstance(v, dict) else np.ascontiguousarray(v) for k, v in tree.items()
  }


def to_sentencepiece(tok: llama2c_tokenizer.Tokenizer) -> tokenizer_lib.Tokenizer:
  """The llama2.c tokenizer as a SentencePiece model with the same ids, pieces and scores (and the
  same added special tokens): what `--to hf` writes as tokenizer.model."""
  kind = sentencepiece_model_pb2.ModelProto.SentencePiece.Type
  specials = {0: ("<unk>", kind.UNKNOWN), tok.bos_id: ("<s>", kind.CONTROL)}
  specials[tok.eos_id] = ("</s>", kind.CONTROL)
  model = sentencepiece_model_pb2.ModelProto()
  for i, (piece, score) in enumerate(zip(tok.pieces, tok.scores, strict=True)):
    if i in specials:
      text, piece_kind = specials[i]
    elif i in llama2c_tokenizer.BYTES:
      text, piece_kind = f"<0x{i - llama2c_tokenizer.BYTES.start:02X}>", kind.BYTE
    else:
      text, piece_kind = piece.decode("utf-8").replace(" ", "▁"), kind.NORMAL
    model.pieces.add(piece=text, score=score, type=piece_kind)
  model.trainer_spec.MergeFrom(
    sentencepiece_model_pb2.TrainerSpec(
      model_type=sentencepiece_model_pb2.TrainerSpec.BPE,
      vocab_size=len(tok.pieces),
      byte_fallback=True,
      unk_id=0,
      bos_id=tok.bos_id,
      eos_id=tok.eos_id,
      pad_id=-1,
    )
  )
  # llama2.c normalizes nothing and adds the dummy prefix itself.
  model.normalizer_spec.MergeFrom(
    sentencepiece_model_pb2.NormalizerSpec(
      name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False
    )
  )
  return tokenizer_lib.Tokenizer(model.SerializeToString(), list(tok.added))
