"""The data pipeline on real files: readers, loss masks, packing, iteration state, mixtures."""

import dataclasses
import json

import numpy as np
import pytest

from jaxtune import config
from jaxtune.data import formats, mixtures, packing, pipeline, preference, templates, tfds
from jaxtune.data import tokenizer as tokenizer_lib
from jaxtune.data.batches import Batches
from jaxtune.data.sources import read_records
from jaxtune.errors import DataError
from jaxtune.sharding import BatchRows


@pytest.fixture(scope="module")
def llama_tokenizer(data_dir):
  return tokenizer_lib.Tokenizer.load(str(data_dir / "tokenizers/llama2c/tokenizer.model"))


def _cfg(**data):
  return config.load(None, [f"data.{k}={v}" for k, v in data.items()]).data


def test_lima_every_assistant_turn_and_only_those_supervised(data_dir, llama_tokenizer):
  path = data_dir / "lima/lima_train_llamafactory.json"
  cfg = _cfg(
    path=path,
    template="lima",
    max_length=100000,
    tokenizer=data_dir / "tokenizers/llama2c/tokenizer.model",
  )
  stats = packing.Stats()
  convs = pipeline.conversations(cfg, 0, stats).train
  assert stats.records == 1029 and len(convs) == 1029
  multi = [c for c in convs if len(c.messages) > 2]
  assert len(multi) == 29
  tok = llama_tokenizer.with_special_tokens(["<EOT>"])
  eot = tok.special_id("<EOT>")
  assert eot == 32000 and tok.vocab_size == 32001
  for conv in multi[:10] + convs[:20]:
    ex = packing.tokenize(templates.render(conv, "lima"), tok, train_on_prompt=False)
    # Split the supervised tokens into runs: each run is one assistant turn and its EOT.
    runs, run = [], []
    for i, s in zip(ex.ids.tolist(), ex.supervised.tolist(), strict=True):
      if s:
        run.append(i)
      elif run:
        runs.append(run)
        run = []
    runs += [run] if run else []
    answers = [m.content for m in conv.messages if m.role == "assistant"]
    assert len(runs) == len(answers)
    for r, answer in zip(runs, answers, strict=True):
      assert r[-1] == eot
      assert tok.decode(r[:-1]) == answer
  # The rendered text survives tokenization exactly.
  conv = multi[0]
  ex = packing.tokenize(templates.render(conv, "lima"), tok, False)
  assert tok.decode(ex.ids, show_special=True) == templates.to_text(templates.render(conv, "lima"))


def test_user_text_cannot_inject_special_tokens(llama_tokenizer):
  tok = llama_tokenizer.with_special_tokens(["<EOT>"])
  conv = formats.Conversation(
    (formats.Message("user", "a <EOT> b"), formats.Message("assistant", "c"))
  )
  ex = packing.tokenize(templates.render(conv, "lima"), tok, False)
  assert ex.ids.tolist().count(tok.special_id("<EOT>")) == 2  # After each turn only.


def test_real_sources_read(data_dir):
  gsm8k = mixtures.gsm8k_task(str(data_dir / "gsm8k/train.jsonl"))
  assert len(gsm8k.records) == 7473 and gsm8k.records[0]["answer"] == "72"
  tasks = mixtures.flan_cot_tasks(str(data_dir / "flan/cot_data"))
  assert sum(len(t.records) for t in tasks) == 33443
  assert {t.name for t in tasks} >= {"aqua", "creak", "ecqa", "gsm8k", "qasc", "strategyqa"}
  aqua = next(t for t in tasks if t.name == "aqua")
  assert "\n(A)" in aqua.records[0]["question"]  # The file's \n escapes are newlines.


def test_flan_mixture_is_proportional_capped_and_deterministic(data_dir):
  tasks = mixtures.flan_cot_tasks(str(data_dir / "flan/cot_data"))
  mix = mixtures.mix(tasks, seed=3, cap=500, few_shot=2)
  counts = {t.name: sum(c.where.startswith(t.name + "[") for c in mix) for t in tasks}
  assert counts == {t.name: min(500, len(t.records)) for t in tasks}
  again = mixtures.mix(tasks, seed=3, cap=500, few_shot=2)
  assert [c.messages for c in mix] == [c.messages for c in again]
  responses = [c.messages[1].content for c in mix]
  cot = [r for r in responses if "So the answer is" in r]
  assert cot and len(cot) < len(responses)  # Both chain-of-thought and direct templates.
  for conv in mix[:200]:
    task = next(t for t in tasks if conv.where.startswith(t.name + "["))
    record = task.records[int(conv.where.split("[")[1][:-1])]
    prompt, response = conv.messages[0].content, conv.messages[1].content
    assert prompt.endswith(record["question"]) or record["question"] in prompt
    if "So the answer is" in response:  # The rationale comes before the answer.
      assert response == f"{record['rationale']} So the answer is {record['answer']}."
  few_shot = [c for c in mix if c.messages[0].content.count("\n\n") >= 2]
  assert few_shot  # Some examples carry exemplars from their own task.


def test_held_out_templates_are_never_trained_on():
  from jaxtune.data import synthetic

  tasks = synthetic.tasks(0, 50)
  train = {c.messages[0].content for c in mixtures.mix(tasks, 0, 0, 0)}
  held = mixtures.mix(tasks, 0, 0, 0, held_out=True)
  eval_prefixes = {"Compute the sum.", "Spell backwards.", "Please do this.", "Letter count."}
  assert all(any(c.messages[0].content.startswith(p) for p in eval_prefixes) for c in held)
  assert not any(t.startswith(tuple(eval_prefixes)) for t in train)
  # The openings drawn for training never use a held-out opening's words.
  held_words = {w.strip(".").lower() for p in eval_prefixes for w in p.split()}
  assert not held_words & set(synthetic._OPENING_WORDS)


def test_held_out_prompts_are_new_wordings_of_trained_requests():
  """Each held-out template is an instruction never trained on before a trained prompt, scored on
  that prompt's trained answer form: the prompt says what form its reference takes."""
  from jaxtune.data import synthetic

  for name, spec in synthetic._TASKS.items():
    for t in spec.held_out:
      trained = spec.templates
      same = [x for x in trained if x.response == t.response and t.prompt.endswith(x.prompt)]
      assert same and all(x.prompt != t.prompt for x in trained), (name, t)


def _write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


@pytest.mark.parametrize(
  "line, reason",
  [
    ('{"instruction": "a", "output": ', "invalid JSON"),
    ('{"instruction": "a"}', "field 'output': missing"),
    ('{"instruction": 3, "output": "b"}', "field 'instruction': expected str, got int"),
    ('{"instruction": "a", "output": "  "}', "field 'output': empty"),
    ("[1, 2]", "expected a JSON object"),
  ],
)
def test_bad_records_name_file_line_and_field(tmp_path, line, reason):
  path = tmp_path / "d.jsonl"
  path.write_text('{"instruction": "ok", "output": "fine"}\n' + line + "\n")
  with pytest.raises(DataError) as e:
    pipeline.conversations(_cfg(path=path, format="alpaca"), 0, packing.Stats())
  assert e.value.where == f"{path}:2" and reason in e.value.reason
  stats = packing.Stats()
  convs = pipeline.conversations(
    _cfg(path=path, format="alpaca", on_bad_record="skip"), 0, stats
  ).train
  assert len(convs) == 1 and stats.skipped == 1 and stats.records == 2
  assert any(reason in r for r in stats.skipped_reasons)


def test_invalid_utf8_names_the_line(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff", "completion": "b"}\n')
  with pytest.raises(DataError, match=r"d\.jsonl:2: invalid UTF-8"):
    read_records(str(path))


def test_formats_and_field_mapping(tmp_path):
  records = [
    {
      "conversations": [
        {"from": "system", "value": "S"},
        {"from": "human", "value": "Q"},
        {"from": "gpt", "value": "A"},
      ]
    },
  ]
  convs = pipeline.conversations(
    _cfg(path=_write_jsonl(tmp_path / "s.jsonl", records)), 0, packing.Stats()
  ).train
  assert [(m.role, m.content) for m in convs[0].messages] == [
    ("system", "S"),
    ("user", "Q"),
    ("assistant", "A"),
  ]
  path = _write_jsonl(tmp_path / "d.jsonl", [{"query": "Q", "reply": "A", "ctx": "C"}])
  convs = pipeline.conversations(
    _cfg(path=path, format="dolly", fields="instruction=query,response=reply,context=ctx"),
    0,
    packing.Stats(),
  ).train
  assert convs[0].messages[0] == formats.Message("user", "Q", "C")
  path = _write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "Q"}]}])
  with pytest.raises(DataError, match="does not end with an assistant turn"):
    pipeline.conversations(_cfg(path=path), 0, packing.Stats())


@pytest.fixture(scope="module")
def small_data():
  cfg = _cfg(synthetic_examples=60, max_length=96)
  return cfg, pipeline.load(cfg, seed=0)


def test_packed_segments_never_mix_and_masks_match_unpacked(small_data):
  cfg, data = small_data
  # One pass (each row stays empty once it has used its examples).
  packed = Batches(data.train, 8, 96, pack=True, seed=0, shuffle=False, repeat=False)
  unpacked = Batches(data.train, 8, 96, pack=False, seed=0, shuffle=False, repeat=False)
  seen_packed, seen_unpacked = [], []
  while packed.epoch == 0:
    b = next(packed)
    for r in range(8):
      segs = b.segment_ids[r]
      for s in set(segs[segs > 0].tolist()):
        idx = np.flatnonzero(segs == s)
        assert np.all(np.diff(idx) == 1)  # Contiguous: segments never interleave.
        np.testing.assert_array_equal(b.positions[r, idx], np.arange(len(idx)))
        seen_packed.append((b.inputs[r, idx].tolist(), b.weights[r, idx].tolist()))
  while unpacked.epoch == 0:
    b = next(unpacked)
    for r in range(8):
      idx = np.flatnonzero(b.segment_ids[r])
      if len(idx):
        assert set(b.segment_ids[r, idx].tolist()) == {1}
        seen_unpacked.append((b.inputs[r, idx].tolist(), b.weights[r, idx].tolist()))
  assert sorted(seen_packed) == sorted(seen_unpacked)
  assert len(seen_packed) == len(data.train)
  # Not vacuous: packing fills fewer row slots (an epoch lasts as long as its longest row, here
  # a row of examples no two of which fit together, so the batch counts can be equal).
  assert packed.batches_per_epoch().slots < unpacked.batches_per_epoch().slots


def test_resumed_iterator_yields_the_same_batches(small_data):
  _, data = small_data
  first = Batches(data.train, 4, 96, pack=True, seed=7)
  for _ in range(40):  # Crosses an epoch boundary.
    next(first)
  state = dict(first.state())
  expected = [next(first) for _ in range(10)]
  resumed = Batches(data.train, 4, 96, pack=True, seed=7)
  resumed.restore(state)
  for a, b in zip(expected, [next(resumed) for _ in range(10)], strict=True):
    for k in vars(a):
      np.testing.assert_array_equal(getattr(a, k), getattr(b, k))


def _process(data, mine: tuple[int, ...]) -> Batches:
  """The iterator of a process that holds rows `mine` of 8 and has read only their examples."""
  rows = BatchRows(8, mine)
  kept = [i for i in range(len(data.train)) if rows.keeps(i)]
  examples = [data.train[i] for i in kept]
  return Batches(examples, 8, 96, pack=True, seed=5, positions=kept, rows=rows)


# How meshes split the 8 rows of a batch over processes: 2 processes (a 2x4 or 8x1 mesh over
# 2 hosts), 4 processes, 8 processes (a host per row).
SPLITS = [
  [(0, 1, 2, 3), (4, 5, 6, 7)],
  [(0, 1), (2, 3), (4, 5), (6, 7)],
  [(r,) for r in range(8)],
]


def test_the_rows_of_every_split_stack_into_the_single_process_batch(small_data):
  _, data = small_data
  single = Batches(data.train, 8, 96, pack=True, seed=5)
  splits = [[_process(data, mine) for mine in split] for split in SPLITS]
  while single.epoch < 2:  # Every row crosses an epoch boundary.
    want = next(single)
    for parts in splits:
      got = [next(p) for p in parts]
      for key in vars(want):
        np.testing.assert_array_equal(np.concatenate([vars(g)[key] for g in got]), vars(want)[key])
      assert all(p.state() == single.state() for p in parts)
  assert want.segment_ids.max() > 1  # Not vacuous: rows hold several examples.
  # The processes agree on the epoch: the most batches any of them needs is the whole batch's.
  plan = Batches(data.train, 8, 96, pack=True, seed=5).batches_per_epoch()
  for split in SPLITS:
    plans = [_process(data, mine).batches_per_epoch() for mine in split]
    assert max(p.batches for p in plans) == plan.batches
    assert sum(p.tokens for p in plans) == plan.tokens == sum(len(ex) - 1 for ex in data.train)
    assert sum(p.slots for p in plans) == plan.slots
  # Complete, each row from its own examples: in its epoch 0, row r trains on each example at the
  # positions p with p % 8 = r once.
  one_pass, seen = Batches(data.train, 8, 96, pack=True, seed=5, repeat=False), {}
  while one_pass.epoch == 0:
    b = next(one_pass)
    for r in range(8):
      segs = b.segment_ids[r]
      seen.setdefault(r, []).extend(b.inputs[r, segs == s].tolist() for s in set(segs[segs > 0]))
  for r in range(8):
    assert sorted(seen[r]) == sorted(ex.ids[:-1].tolist() for ex in data.train[r::8])


def test_a_restore_on_another_split_of_the_rows_goes_on_in_the_same_order(small_data, caplog):
  _, data = small_data
  single = Batches(data.train, 8, 96, pack=True, seed=5)
  for _ in range(5):
    next(single)
  state = single.state()
  expected = [next(single) for _ in range(3)]  # The run, uninterrupted.
  for split in SPLITS:
    parts = [_process(data, mine) for mine in split]
    for p in parts:
      p.restore(state)
    for want in expected:
      got = np.concatenate([next(p).inputs for p in parts])
      np.testing.assert_array_equal(got, want.inputs)
  assert not caplog.records
  resumed = Batches(data.train, 8, 96, pack=True, seed=5)
  resumed.restore({"batches": 5, "blocks": 4})  # An older jaxtune's state: batches of row blocks.
  assert "the checkpoint's batches came from an older data order" in caplog.text
  np.testing.assert_array_equal(next(resumed).inputs, expected[0].inputs)


def test_a_row_without_examples_is_an_error_naming_it():
  ex = packing.Example(np.arange(5, dtype=np.int32), np.ones(5, bool))
  with pytest.raises(DataError, match=r"row 3 of the batch: has no training example: 3 examples"):
    Batches([ex] * 3, 8, 16, pack=True, seed=0)
  one_pass = Batches([ex] * 3, 8, 16, pack=True, seed=0, repeat=False)  # Held-out data may.
  assert (next(one_pass).segment_ids.max(1) == [1, 1, 1, 0, 0, 0, 0, 0]).all()


def test_a_process_reads_and_tokenizes_only_the_records_of_its_rows(tmp_path, data_dir):
  records = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}"} for i in range(10)]
  path = _write_jsonl(tmp_path / "d.jsonl", records)
  with open(path, "a") as f:  # Record 10, for row 10 % 4 = 2 only.
    f.write("{not json\n")
  cfg = _cfg(path=path, tokenizer=data_dir / "tokenizers/llama2c/tokenizer.model")
  with pytest.raises(DataError, match=r"d.jsonl:11: invalid JSON"):
    pipeline.load(cfg, 0)
  parts = [pipeline.load(cfg, 0, BatchRows(4, mine)) for mine in ((0, 1), (3,))]
  assert [p.positions.tolist() for p in parts] == [[0, 1, 4, 5, 8, 9], [3, 7]]
  assert [p.stats.records for p in parts] == [6, 2]
  with pytest.raises(DataError, match=r"d.jsonl:11: invalid JSON"):
    pipeline.load(cfg, 0, BatchRows(4, (2,)))
  whole = pipeline.load(
    dataclasses.replace(cfg, path=_write_jsonl(tmp_path / "w.jsonl", records)), 0
  )
  for part in parts:
    for ex, p in zip(part.train, part.positions, strict=True):
      np.testing.assert_array_equal(ex.ids, whole.train[p].ids)


def test_truncation_policy_is_counted():
  ex = packing.Example(np.arange(10, dtype=np.int32), np.array([0] * 4 + [1] * 6, bool))
  stats = packing.Stats()
  assert len(packing.fit(ex, 6, "truncate", stats)) == 7 and stats.truncated == 1
  assert packing.fit(ex, 6, "drop", stats) is None and stats.dropped_too_long == 1
  assert packing.fit(ex, 3, "truncate", stats) is None and stats.dropped_unsupervised == 1


def test_tfds_source_gives_the_same_examples_as_its_jsonl(tmp_path, small_data):
  records = [{"instruction": f"Say {i}.", "input": "", "output": f"{i} ☕"} for i in range(30)]
  path = _write_jsonl(tmp_path / "inst.jsonl", records)
  prepared = tfds.prepare(str(path), str(tmp_path / "tfds"))
  base = dict(tokenizer_vocab_size=300, max_length=512)
  from_jsonl = pipeline.load(_cfg(path=path, **base), seed=0)
  from_tfds = pipeline.load(_cfg(path=prepared, **base), seed=0)
  assert len(from_jsonl.train) == len(from_tfds.train) == 30
  for a, b in zip(from_jsonl.train, from_tfds.train, strict=True):
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.supervised, b.supervised)


def test_config_choices_match_the_registries():
  hints = {f.name: f.type for f in dataclasses.fields(config.DataConfig)}
  assert "alpaca" in hints["template"] and "flan_cot" in hints["format"]
  import typing

  data_hints = typing.get_type_hints(config.DataConfig)
  assert set(typing.get_args(data_hints["template"])) == set(templates.TEMPLATES)
  assert set(typing.get_args(data_hints["format"])) == {
    "auto",
    *formats.FORMATS,
    *preference.FORMATS,
  }


def test_train_on_prompt_supervises_everything_but_the_first_token(small_data):
  cfg, data = small_data
  conv = data.held_out[0]
  chunks = templates.render(conv, cfg.template)
  default = packing.tokenize(chunks, data.tokenizer, train_on_prompt=False)
  everything = packing.tokenize(chunks, data.tokenizer, train_on_prompt=True)
  np.testing.assert_array_equal(default.ids, everything.ids)
  assert everything.supervised.all() and 0 < default.supervised.sum() < len(default)
  answer = conv.messages[-1].content
  assert data.tokenizer.decode(default.ids[default.supervised]).startswith(answer)


@pytest.mark.parametrize(
  "line, reason",
  [
    ('{"prompt": "a\\ud800", "completion": "b"}', "not valid Unicode"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"prompt": "a", "completion": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    (
      '{"conversations": [{"from": "gpt", "value": "Hi"}, {"from": "human", "value": "?"}, '
      '{"from": "gpt", "value": "Yes"}]}',
      "does not start with a user turn",
    ),
    (
      '{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}, '
      '{"role": "assistant", "content": "b"}]}',
      "a system message must come first",
    ),
  ],
)
def test_malformed_records_are_data_errors_that_can_be_skipped(tmp_path, line, reason):
  path = tmp_path / "d.jsonl"
  path.write_text('{"prompt": "ok", "completion": "fine"}\n' + line + "\n")
  with pytest.raises(DataError) as e:
    pipeline.conversations(_cfg(path=path), 0, packing.Stats())
  assert e.value.where == f"{path}:2" and reason in e.value.reason
  stats = packing.Stats()
  convs = pipeline.conversations(_cfg(path=path, on_bad_record="skip"), 0, stats).train
  assert len(convs) == 1 and stats.skipped == 1


@pytest.mark.parametrize("name, text", [("d.jsonl", ""), ("e.jsonl", "\n \n"), ("d.json", "[]")])
def test_a_file_without_records_says_so(tmp_path, name, text):
  path = tmp_path / name
  path.write_text(text)
  with pytest.raises(DataError, match=f"{name}: no records"):
    pipeline.load(_cfg(path=path), 0)


def test_a_file_of_only_bad_records_skipped_says_so(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text('{"prompt": "a"}\n')
  with pytest.raises(DataError, match=r"d\.jsonl: no usable record: 1 of 1 skipped"):
    pipeline.load(_cfg(path=path, on_bad_record="skip"), 0)


def test_an_empty_folder_is_not_a_data_source(tmp_path):
  with pytest.raises(DataError, match="neither a TFDS dataset nor Flan CoT .tsv files"):
    pipeline.load(_cfg(path=tmp_path), 0)
