"""jaxtune's token ids against transformers' tokenizer on the same rendered text: the prompts of
every chat template, whole conversations as training renders them, and the prompts every eval
task builds, for each kind of tokenizer jaxtune reads.

transformers encodes the rendered text (`templates.to_text`) whole, its leading BOS added by
`add_special_tokens` and the other special tokens recognized in the text. So "Once" after BOS is
"▁Once" (the dummy prefix), and the text after a special token in the middle ("<|im_start|>user",
Llama 2's "</s><s>[INST]") has none with transformers 5's LlamaTokenizer and Metaspace "first",
one with a legacy tokenizer ("always").
"""

import dataclasses
import json
import types

import numpy as np
import pytest
import sentencepiece as spm
import tokenizers
import transformers
from test_llama2c import PUBLISHED
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers.tokenization_utils_base import generate_merges

from jaxtune.config import DataConfig
from jaxtune.convert import export
from jaxtune.data import llama2c_tokenizer, packing, pipeline, templates
from jaxtune.data import tokenizer as tokenizer_lib
from jaxtune.data.formats import Conversation, Message
from jaxtune.data.hf_tokenizer import HFTokenizer
from jaxtune.eval import base, bbh, gsm8k, mmlu, scoring

SPECIALS = [t for template in templates.TEMPLATES.values() for t in template.special_tokens]
KINDS = ("sentencepiece", "llama2c", "metaspace_json", "legacy_json", "byte_level")


@pytest.fixture(scope="module")
def conversations(data_dir):
  """LIMA's multi-turn conversations and some single-turn ones, and two with a system prompt."""
  cfg = DataConfig(path=str(data_dir / "lima/lima_train_llamafactory.json"))
  convs = pipeline.conversations(cfg, 0, packing.Stats()).train
  picked = [c for c in convs if len(c.messages) > 2][:4] + convs[:8]
  system = Message("system", "You are a helpful assistant. Answer briefly.")
  return picked + [dataclasses.replace(c, messages=(system, *c.messages)) for c in picked[:2]]


def _sentencepiece(data_dir, tmp_path):
  """Meta's Llama tokenizer.model. transformers' LlamaTokenizer on its pieces, with the merges
  ranked by piece score as SentencePiece ranks them: transformers 5's own conversion of a bare
  tokenizer.model ranks them by id, which merges runs of spaces differently ("▁▁" first)."""
  model = str(data_dir / "tokenizers/llama2c/tokenizer.model")
  ours = tokenizer_lib.Tokenizer.load(model).with_special_tokens(SPECIALS)
  sp = spm.SentencePieceProcessor(model_file=model)
  vocab = {sp.id_to_piece(i): i for i in range(sp.vocab_size())}
  scores = {p: sp.get_score(i) for p, i in vocab.items()}
  merges = generate_merges(vocab, scores)
  theirs = transformers.LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)
  theirs.add_special_tokens({"additional_special_tokens": list(ours.added)})
  return ours, theirs


def _llama2c(data_dir, tmp_path):
  """stories260K's tok512.bin, and the folder `jaxtune convert --to hf` writes for it."""
  tok = llama2c_tokenizer.Tokenizer.load(str(data_dir / "models/stories260K/tok512.bin"))
  ours = tok.with_special_tokens(SPECIALS)
  export.save_hf_tokenizer(ours, tmp_path)
  return ours, transformers.AutoTokenizer.from_pretrained(tmp_path)


def _tokenizer_json(data_dir, tmp_path, legacy: bool):
  """Meta's Llama tokenizer as transformers 5 writes its tokenizer.json (Metaspace "first"), or
  as transformers 4 did (a Prepend normalizer: the dummy prefix after every special token)."""
  source = tmp_path / "source"
  source.mkdir()
  (source / "tokenizer.model").write_bytes(
    (data_dir / "tokenizers/llama2c/tokenizer.model").read_bytes()
  )
  config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True}
  (source / "tokenizer_config.json").write_text(json.dumps(config))
  transformers.AutoTokenizer.from_pretrained(source).save_pretrained(tmp_path / "json")
  spec_path = tmp_path / "json" / "tokenizer.json"
  if legacy:
    spec = json.loads(spec_path.read_text())
    spec["normalizer"] = {
      "type": "Sequence",
      "normalizers": [
        {"type": "Prepend", "prepend": "▁"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
      ],
    }
    spec["pre_tokenizer"] = None
    spec_path.write_text(json.dumps(spec))
  ours = HFTokenizer.load(str(spec_path)).with_special_tokens(SPECIALS)
  ours.save(str(tmp_path / "ours"))  # As tokenizer_class PreTrainedTokenizerFast: spec as is.
  return ours, transformers.AutoTokenizer.from_pretrained(tmp_path / "ours")


def _byte_level(data_dir, tmp_path):
  """A byte-level BPE (GPT-2, Llama 3, Qwen2 style) trained here on LIMA: no prefix space."""
  lima = json.loads((data_dir / "lima/lima_train_llamafactory.json").read_text())
  tk = tokenizers.Tokenizer(models.BPE())
  tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tk.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=1000,
    special_tokens=["<|endoftext|>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tk.train_from_iterator((r["instruction"] + r["output"] for r in lima[:300]), trainer)
  (tmp_path / "tokenizer.json").write_text(tk.to_str())
  ours = HFTokenizer(tk.to_str(), bos="<|endoftext|>", eos="<|endoftext|>")
  ours = ours.with_special_tokens(SPECIALS)
  ours.save(str(tmp_path / "ours"))
  return ours, transformers.AutoTokenizer.from_pretrained(tmp_path / "ours")


_BUILDERS = {
  "sentencepiece": _sentencepiece,
  "llama2c": _llama2c,
  "metaspace_json": lambda d, t: _tokenizer_json(d, t, legacy=False),
  "legacy_json": lambda d, t: _tokenizer_json(d, t, legacy=True),
  "byte_level": _byte_level,
}


@pytest.fixture(scope="module", params=KINDS)
def pair(request, data_dir, tmp_path_factory):
  """(kind, jaxtune's tokenizer, transformers' tokenizer), with the templates' tokens added."""
  ours, theirs = _BUILDERS[request.param](data_dir, tmp_path_factory.mktemp(request.param))
  assert theirs.bos_token_id == ours.bos_id and theirs.eos_token_id == ours.eos_id
  assert theirs.convert_tokens_to_ids(SPECIALS) == [ours.special_id(t) for t in SPECIALS]
  return request.param, ours, theirs


def test_once_after_bos_and_text_after_a_special_token(pair):
  """The cases the rule is about, spelled out: "Once" after BOS, and text after a special token
  in the middle (prefixed only by the legacy tokenizer)."""
  kind, ours, theirs = pair
  once = packing.prompt_ids(_conv("Once upon a time"), "raw", ours)
  assert once == [ours.bos_id, *theirs("Once upon a time", add_special_tokens=False).input_ids]
  if kind != "byte_level":  # Whose transformers tokenizer adds no BOS.
    assert once == theirs("Once upon a time").input_ids
  chunks = templates.render(_conv("Hi", "Hello", "Bye"), "llama2")
  ids = _ours_ids(ours, chunks)
  assert ids == _theirs_ids(theirs, ours, chunks)
  if kind != "byte_level":
    assert ours.piece(once[1]).replace(" ", "▁") == "▁Once"  # llama2.c pieces hold spaces.
    after_bos = ours.piece(ids[ids.index(ours.bos_id, 1) + 1])
    assert after_bos == ("▁[" if kind == "legacy_json" else "[")


def _conv(*turns):
  roles = ["user", "assistant"] * len(turns)
  return Conversation(tuple(Message(r, t) for r, t in zip(roles, turns, strict=False)), "test")


def _ours_ids(ours, chunks, train_on_prompt=False):
  return packing.tokenize(chunks, ours, train_on_prompt).ids.tolist()


def _theirs_ids(theirs, ours, chunks):
  """transformers on the rendered text: the leading BOS as `add_special_tokens` adds it, the
  rest with its special tokens ("<s>", "</s>", "<|im_end|>", ...) recognized."""
  bos, eos = ours.piece(ours.bos_id), ours.piece(ours.eos_id)
  text = templates.to_text(chunks, bos, eos)
  lead = chunks[0].special and chunks[0].text == templates.BOS
  text = text[len(bos) :] if lead else text
  return [theirs.bos_token_id] * lead + theirs(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize("template", sorted(templates.TEMPLATES))
def test_prompts_and_conversations_of_every_template(pair, template, conversations):
  _, ours, theirs = pair
  for conv in conversations:
    if conv.messages[0].role == "system" and template in ("alpaca", "lima", "raw"):
      continue  # No place for a system prompt.
    prompt = dataclasses.replace(conv, messages=conv.messages[:-1])
    chunks = templates.render(prompt, template)
    assert packing.prompt_ids(prompt, template, ours) == _theirs_ids(theirs, ours, chunks)
    # A whole conversation as trained on with train_on_prompt: one text between special tokens.
    chunks = templates.render(conv, template)
    ids = _ours_ids(ours, chunks, True)
    assert ids == _theirs_ids(theirs, ours, chunks), conv.where
    # Decoding drops the dummy prefix where it was added: the rendered text comes back.
    bos, eos = ours.piece(ours.bos_id), ours.piece(ours.eos_id)
    assert ours.decode(ids, show_special=True) == templates.to_text(chunks, bos, eos)


def _recorded_prompts(monkeypatch, ours, task, options):
  """(text, template, ids) of every prompt `task.run` builds (through `base.prompt_ids`), with
  its scoring and generation stubbed out."""
  recorded = []
  prompt_ids = base.prompt_ids

  def record(model, text, template):
    ids = prompt_ids(model, text, template)
    recorded.append((text, template, ids))
    return ids

  monkeypatch.setattr(base, "prompt_ids", record)
  monkeypatch.setattr(scoring, "loglikelihoods", lambda m, requests, b: np.zeros(len(requests)))
  monkeypatch.setattr(base, "complete", lambda m, prompts, *a, **k: [""] * len(prompts))
  model = types.SimpleNamespace(tokenizer=ours, config=types.SimpleNamespace(max_seq_len=1 << 20))
  task.run(model, options)
  return recorded


def _eval_options(data_dir):
  """A few questions of every eval task that builds prompts from text, with their default shots."""
  return {
    "mmlu": base.Options(
      data=str(data_dir / "mmlu/data"), split="val", limit=2, subjects=("astronomy", "virology")
    ),
    "gsm8k": base.Options(
      data=str(data_dir / "gsm8k/train.jsonl"),
      exemplars=str(data_dir / "gsm8k/train.jsonl"),
      limit=3,
    ),
    "bbh": base.Options(data=str(data_dir / "bbh/bbh"), limit=2),
  }


@pytest.mark.parametrize("task", [mmlu, gsm8k, bbh], ids=["mmlu", "gsm8k", "bbh"])
def test_eval_task_prompts(pair, task, data_dir, monkeypatch):
  _, ours, theirs = pair
  options = _eval_options(data_dir)[task.__name__.rsplit(".", 1)[-1]]
  recorded = _recorded_prompts(monkeypatch, ours, task, options)
  assert len(recorded) >= 3
  for text, template, ids in recorded:
    assert template == "raw"
    assert ids == [theirs.bos_token_id, *theirs(text, add_special_tokens=False).input_ids]
  if task is mmlu:  # The answer letters, scored after the prompt: " A" is "▁A" in both.
    for letter in mmlu.CHOICES:
      text = recorded[0][0]
      whole = theirs(text + f" {letter}", add_special_tokens=False).input_ids
      assert recorded[0][2][1:] + ours.encode(f" {letter}") == whole


def test_converted_stories260k_folder_tokenizes_as_jaxtune(data_dir, tmp_path, monkeypatch):
  """`jaxtune convert stories260K.bin DST --to hf` writes a tokenizer that transformers'
  AutoTokenizer loads and that gives jaxtune's ids (BOS added by `add_special_tokens`, as
  lm-evaluation-harness and `generate` pipelines call it) on every eval task's prompts, the
  generation prompts and the perplexity examples; the model generates the published text."""
  export.convert(data_dir / "models/stories260K/stories260K.bin", tmp_path / "hf", "hf")
  theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
  ours = pipeline.load_tokenizer(str(data_dir / "models/stories260K/tok512.bin"))
  for name, options in _eval_options(data_dir).items():
    task = {"mmlu": mmlu, "gsm8k": gsm8k, "bbh": bbh}[name]
    for text, _, ids in _recorded_prompts(monkeypatch, ours, task, options):
      assert ids == theirs(text).input_ids, (name, text[:80])
  data = data_dir / "alpaca_eval/gpt4_1106_preview_model_outputs.json"
  cfg = DataConfig(path=str(data), on_bad_record="skip")
  for conv in pipeline.conversations(cfg, 0, packing.Stats()).train[:20]:
    prompt = dataclasses.replace(conv, messages=conv.messages[:-1])  # As generation-stats does.
    assert packing.prompt_ids(prompt, "raw", ours) == theirs(conv.messages[0].content).input_ids
    chunks = templates.render(conv, "raw")  # As perplexity reads it: BOS, prompt, response, EOS.
    whole = theirs(templates.to_text(chunks, bos="", eos="")).input_ids + [theirs.eos_token_id]
    assert packing.tokenize(chunks, ours, train_on_prompt=False).ids.tolist() == whole
  # The same folder read back by jaxtune (its tokenizer.model) encodes as tok512.bin does.
  again = pipeline.load_tokenizer(str(tmp_path / "hf"))
  text = (data_dir / "bbh/cot-prompts/date_understanding.txt").read_text()
  assert again.encode(text, first=True) == ours.encode(text, first=True)
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
  prompt = theirs("Once upon a time", return_tensors="pt")
  out = model.generate(**prompt, max_new_tokens=40, do_sample=False)
  assert theirs.decode(out[0], skip_special_tokens=True).startswith(PUBLISHED[:120])
