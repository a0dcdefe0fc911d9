"""Hugging Face tokenizer.json tokenizers against transformers' own reading of the same files, on
real text (LIMA), and through the data pipeline: a byte-level BPE (as GPT-2, Llama 3, Qwen2) and
Meta's Llama tokenizer as transformers converts it to tokenizer.json (Metaspace BPE)."""

import json

import pytest
import tokenizers
import transformers
from test_hf import CASES
from tokenizers import decoders, models, pre_tokenizers, trainers

import jaxtune
from jaxtune import config
from jaxtune.convert import export
from jaxtune.data import packing, pipeline, templates
from jaxtune.data import tokenizer as tokenizer_lib
from jaxtune.data.hf_tokenizer import HFTokenizer


@pytest.fixture(scope="module")
def lima(data_dir):
  cfg = config.load(None, [f"data.path={data_dir / 'lima/lima_train_llamafactory.json'}"]).data
  convs = pipeline.conversations(cfg, 0, packing.Stats()).train
  return [c for c in convs if len(c.messages) > 2][:5] + convs[:25]


@pytest.fixture(scope="module")
def byte_level(lima, tmp_path_factory):
  """A byte-level BPE trained here on LIMA, saved by transformers."""
  tk = tokenizers.Tokenizer(models.BPE())
  tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tk.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=800,
    special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tk.train_from_iterator((m.content for c in lima for m in c.messages), trainer)
  folder = tmp_path_factory.mktemp("byte_level")
  transformers.PreTrainedTokenizerFast(
    tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
  ).save_pretrained(folder)
  return folder


@pytest.fixture(scope="module")
def metaspace(data_dir, tmp_path_factory):
  """Meta's Llama tokenizer.model, converted to tokenizer.json by transformers."""
  source = tmp_path_factory.mktemp("llama_sp")
  (source / "tokenizer.model").write_bytes(
    (data_dir / "tokenizers/llama2c/tokenizer.model").read_bytes()
  )
  (source / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
  folder = tmp_path_factory.mktemp("metaspace")
  transformers.AutoTokenizer.from_pretrained(source).save_pretrained(folder)
  assert not (folder / "tokenizer.model").exists()
  return folder


@pytest.mark.parametrize("kind", ["byte_level", "metaspace"])
def test_encoding_equals_transformers(kind, lima, request):
  folder = request.getfixturevalue(kind)
  ours = pipeline.load_tokenizer(str(folder))
  assert isinstance(ours, HFTokenizer)
  theirs = transformers.AutoTokenizer.from_pretrained(folder)
  assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (
    theirs.bos_token_id,
    theirs.eos_token_id,
    len(theirs),
  )
  texts = [m.content for c in lima for m in c.messages]
  texts += ["naïve café ☕ 🙂", "a <|im_end|> b <s></s>", "  two  spaces\n\n\tend "]
  for text in texts:
    ids = ours.encode(text, first=True)
    # Special tokens in text stay text: transformers' `split_special_tokens`.
    assert ids == theirs(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert ours.decode(ids) == theirs.decode(ids)
    if kind == "byte_level" or not text.startswith(" "):  # Metaspace drops a leading space.
      assert ours.decode(ids) == text


@pytest.mark.parametrize("kind, template", [("byte_level", "chatml"), ("metaspace", "lima")])
def test_rendered_conversations_survive_tokenization(kind, template, lima, request, tmp_path):
  """Chunk by chunk, as the data pipeline encodes them, conversations decode back exactly; the
  template's special tokens are single tokens (the tokenizer's own, or added and saved)."""
  specials = templates.TEMPLATES[template].special_tokens
  tok = pipeline.load_tokenizer(str(request.getfixturevalue(kind))).with_special_tokens(specials)
  tok.save(str(tmp_path))
  tok = pipeline.load_tokenizer(str(tmp_path))  # As a run directory's tokenizer/ is read.
  for conv in lima:
    chunks = templates.render(conv, template)
    ex = packing.tokenize(chunks, tok, train_on_prompt=False)
    expected = templates.to_text(chunks, tok.piece(tok.bos_id), tok.piece(tok.eos_id))
    assert tok.decode(ex.ids, show_special=True) == expected
    for token in specials:
      rendered = expected.count(token)
      assert ex.ids.tolist().count(tok.special_id(token)) == rendered > 0
  theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)  # Saved for transformers too.
  for token in specials:
    assert theirs.convert_tokens_to_ids(token) == tok.special_id(token)


def test_prefix_space_only_on_the_first_chunk(metaspace, data_dir):
  """As jaxtune's SentencePiece tokenizer does with the same Llama model."""
  tok = HFTokenizer.load(str(metaspace / "tokenizer.json"))
  sp = tokenizer_lib.Tokenizer.load(str(data_dir / "tokenizers/llama2c/tokenizer.model"))
  for first in (True, False):
    ids = tok.encode("Hello", first) + tok.encode(" world. Once upon a time")
    assert ids == sp.encode("Hello", first) + sp.encode(" world. Once upon a time")
    assert tok.decode(ids) == sp.decode(ids) == "Hello world. Once upon a time"
  assert [tok.piece(i) for i in tok.encode("Hello", first=True)] == ["▁Hello"]
  assert [tok.piece(i) for i in tok.encode("Hello")] == ["Hello"]


def test_hf_folder_with_tokenizer_json_converts_both_ways(byte_level, tmp_path):
  """A GPT-2 folder whose tokenizer is only tokenizer.json: `jaxtune.load` finds it, and it
  survives conversion to a jaxtune run and back for transformers."""
  config = transformers.AutoConfig.for_model("gpt2", **dict(CASES["gpt2"][1], vocab_size=800))
  transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "src")
  for name in ("tokenizer.json", "tokenizer_config.json"):
    (tmp_path / "src" / name).write_bytes((byte_level / name).read_bytes())
  assert isinstance(jaxtune.load(tmp_path / "src").tokenizer, HFTokenizer)
  export.convert(tmp_path / "src", tmp_path / "run", "jaxtune")
  export.convert(tmp_path / "run", tmp_path / "out", "hf")
  assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (
    byte_level / "tokenizer.json"
  ).read_bytes()
  original = transformers.AutoTokenizer.from_pretrained(byte_level)
  exported = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
  text = "Once upon a time <|im_end|> naïve"
  assert exported(text)["input_ids"] == original(text)["input_ids"]
  assert (
    jaxtune.load(tmp_path / "out").tokenizer.encode(text)
    == original(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
  )
