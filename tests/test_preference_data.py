"""Preference data: pairwise and ranked records in every accepted form, their bad records, loss
masks equal to SFT's, groups packed one segment per response, JSONL and TFDS alike."""

import dataclasses
import json

import numpy as np
import pytest

from jaxtune import config
from jaxtune.data import pipeline, preference, synthetic, tfds
from jaxtune.data.batches import Batches
from jaxtune.data.packing import Group, Stats
from jaxtune.data.sources import Record
from jaxtune.errors import ConfigError, DataError
from jaxtune.model import transformer
from jaxtune.train import objective

USER, CHOSEN, REJECTED = "Name a color.", "Blue.", "Seven."


def _msg(role, content):
  return {"role": role, "content": content}


PAIRWISE_FORMS = {
  "text": {"prompt": USER, "chosen": CHOSEN, "rejected": REJECTED},
  "trl_conversational": {
    "prompt": [_msg("user", USER)],
    "chosen": [_msg("assistant", CHOSEN)],
    "rejected": [_msg("assistant", REJECTED)],
  },
  "trl_implicit_prompt": {
    "chosen": [_msg("user", USER), _msg("assistant", CHOSEN)],
    "rejected": [_msg("user", USER), _msg("assistant", REJECTED)],
  },
  "hh_rlhf": {
    "chosen": f"\n\nHuman: {USER}\n\nAssistant: {CHOSEN}",
    "rejected": f"\n\nHuman: {USER}\n\nAssistant: {REJECTED}",
  },
}


@pytest.mark.parametrize("form", sorted(PAIRWISE_FORMS))
def test_every_pairwise_form_reads_as_the_same_pair(form):
  fields = PAIRWISE_FORMS[form]
  record = Record(fields, "f.jsonl:1")
  assert preference.detect(record, {}) == "pairwise"
  pref = preference.to_preference(record, "pairwise", {})
  assert pref.ranks == (0, 1) and pref.fields == ("chosen", "rejected")
  got = [[(m.role, m.content) for m in c.messages] for c in pref.conversations]
  assert got == [[("user", USER), ("assistant", a)] for a in (CHOSEN, REJECTED)]


def test_hh_rlhf_keeps_the_earlier_turns_and_field_names_map():
  history = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: " + USER + "\n\nAssistant: "
  record = Record({"good": history + CHOSEN, "bad": history + REJECTED}, "f.jsonl:1")
  names = {"chosen": "good", "rejected": "bad"}
  pref = preference.to_preference(record, preference.detect(record, names), names)
  assert [m.content for m in pref.conversations[1].messages] == ["Hi", "Hello!", USER, REJECTED]


def test_ranks_and_scores_give_the_same_ranking():
  responses = ["b", "a", "d", "c"]
  by_rank = {"prompt": "p", "responses": responses, "ranks": [2, 1, 4, 3]}
  by_score = {"prompt": "p", "responses": responses, "scores": [0.5, 0.9, -1, 0.1]}
  for fields in (by_rank, by_score):
    record = Record(fields, "f.jsonl:1")
    pref = preference.to_preference(record, preference.detect(record, {}), {})
    assert pref.ranks == (1, 0, 3, 2)
    assert pref.best.messages[-1].content == "a"


@pytest.mark.parametrize(
  "fields, reason",
  [
    (
      {"prompt": "p", "chosen": "same", "rejected": "same"},
      "field 'rejected': identical to 'chosen'",
    ),
    (
      {"prompt": "p", "responses": ["a", "b", "c"], "ranks": [0, 1, 1]},
      "field 'ranks': responses 1 and 2 tie at 1; a strict order is needed",
    ),
    (
      {"prompt": "p", "responses": ["a", "b"], "scores": [0.5, 0.5]},
      "field 'scores': responses 0 and 1 tie at 0.5",
    ),
    ({"prompt": "p", "responses": ["a"], "ranks": [0]}, "field 'responses': expected a list of 2"),
    ({"prompt": "p", "responses": ["a", "b"]}, "field 'ranks' (or 'scores'): missing"),
    ({"prompt": "p", "chosen": "a", "rejected": ""}, "field 'rejected': the response must end"),
    (
      {
        "chosen": [_msg("user", "x"), _msg("assistant", "a")],
        "rejected": [_msg("user", "y"), _msg("assistant", "b")],
      },
      "field 'rejected': without a prompt field",
    ),
    (
      {"chosen": "junk\n\nHuman: x\n\nAssistant: a", "rejected": "b"},
      "field 'chosen': text before",
    ),
    (
      {"prompt": "p", "chosen": [{"role": "robot", "content": "a"}], "rejected": "b"},
      "field 'chosen': message 0",
    ),
  ],
)
def test_bad_records_name_file_line_and_field(fields, reason):
  record = Record(fields, "prefs.jsonl:7")
  fmt = preference.detect(record, {})
  with pytest.raises(DataError) as e:
    preference.to_preference(record, fmt, {})
  assert str(e.value).startswith(f"prefs.jsonl:7: {reason}"), str(e.value)


def _write(tmp_path, records, name="prefs.jsonl"):
  path = tmp_path / name
  path.write_text("\n".join(json.dumps(r) for r in records))
  return path


def _records(n=24):
  out = [
    {"prompt": f"What is {i} + {i}?", "chosen": f"{2 * i}.", "rejected": f"{2 * i + 1}."}
    for i in range(n)
  ]
  out.append({"prompt": "Rank these.", "responses": ["x", "yy", "zzz"], "scores": [1, 3, 2]})
  return out


def _cfg(path, *extra):
  items = [f"data.path={path}", "data.template=chatml", "data.tokenizer_vocab_size=300", *extra]
  return config.load(None, [*items, "train.batch_size=4"])


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
  path = _write(tmp_path_factory.mktemp("prefs"), _records())
  cfg = _cfg(path, "data.max_length=64")
  return path, cfg, pipeline.load(cfg.data, seed=0)


def test_responses_have_sft_loss_masks_and_pack_whole_into_rows(prefs):
  _, cfg, data = prefs
  assert all(isinstance(g, Group) for g in data.train) and len(data.train) == 25
  # The chosen response is exactly the SFT example of its conversation.
  pref = preference.to_preference(Record(_records()[3], "x"), "pairwise", {})
  sft = pipeline.examples([pref.best], cfg.data, data.tokenizer, Stats())[0]
  np.testing.assert_array_equal(data.train[3].responses[0].ids, sft.ids)
  np.testing.assert_array_equal(data.train[3].responses[0].supervised, sft.supervised)
  batches = Batches(data.train, 4, 64, pack=True, seed=0, repeat=False)  # One pass.
  seen = 0
  for _ in range(batches.batches_per_epoch().batches):
    b = next(batches)
    for r in range(b.inputs.shape[0]):
      for g in set(b.groups[r].tolist()) - {0}:
        at = b.groups[r] == g
        segments = sorted(set(b.segment_ids[r, at].tolist()))
        ranks = [int(b.ranks[r, at & (b.segment_ids[r] == s)][0]) for s in segments]
        assert sorted(ranks) == list(range(len(segments))) and len(segments) in (2, 3)
        for s in segments:  # Each response supervises its own tokens only.
          assert b.weights[r, at & (b.segment_ids[r] == s)].sum() > 0
        seen += 1
  assert seen == 25
  assert data.held_out == [] and len(data.stats.skipped_reasons) == 0


def test_tfds_gives_the_same_groups(prefs, tmp_path):
  path, cfg, data = prefs
  prepared = tfds.prepare(str(path), str(tmp_path / "tfds"))
  from_tfds = pipeline.load(_cfg(prepared, "data.max_length=64").data, seed=0)
  for a, b in zip(data.train, from_tfds.train, strict=True):
    assert a.ranks == b.ranks
    for x, y in zip(a.responses, b.responses, strict=True):
      np.testing.assert_array_equal(x.ids, y.ids)


def test_a_response_truncated_to_nothing_is_an_error_or_skipped(tmp_path):
  records = _records(8)
  records[5] = {"prompt": "long " * 150 + "prompt", "chosen": "a", "rejected": "b"}
  path = _write(tmp_path, records)
  with pytest.raises(DataError, match=r"prefs.jsonl:6: field 'chosen': the response is truncated"):
    pipeline.load(_cfg(path, "data.max_length=96").data, seed=0)
  data = pipeline.load(_cfg(path, "data.max_length=96", "data.on_bad_record=skip").data, seed=0)
  assert data.stats.skipped == 1 and len(data.train) == 8
  assert "truncated to nothing" in next(iter(data.stats.skipped_reasons))


def test_bad_records_skipped_are_counted(tmp_path):
  records = _records(8) + [{"prompt": "p", "chosen": "same", "rejected": "same"}]
  data = pipeline.load(_cfg(_write(tmp_path, records), "data.on_bad_record=skip").data, seed=0)
  assert data.stats.skipped == 1 and len(data.train) == 9
  assert data.stats.skipped_reasons == {"field 'rejected': identical to 'chosen'": 1}


def test_embedded_pairs_answer_one_prompt_right_and_wrong():
  cfg = config.load(None, ["data.format=pairwise", "data.synthetic_examples=20"]).data
  convs = pipeline.conversations(cfg, seed=0, stats=Stats())
  records = sum(len(t.records) for t in synthetic.tasks(0, 20))  # 20 a task, times its share.
  assert len(convs.train) > 0.9 * records and convs.held_out
  for pref in convs.train + convs.held_out:
    chosen, rejected = (c.messages for c in pref.conversations)
    assert chosen[0] == rejected[0] and chosen[1].content != rejected[1].content


@pytest.mark.parametrize(
  "name, preferences, message", [("dpo", False, "needs preference data"), ("sft", True, "cannot")]
)
def test_objectives_refuse_the_other_kind_of_data(prefs, name, preferences, message):
  _, cfg, data = prefs
  best = [preference.to_preference(Record(r, "x"), "pairwise", {}).best for r in _records(4)[:4]]
  sft_examples = pipeline.examples(best, cfg.data, data.tokenizer, Stats())
  examples, right = (data.train, sft_examples) if preferences else (sft_examples, data.train)
  train = config.TrainConfig(objective=name)
  goal = objective.make(transformer.Transformer(cfg.model), train)
  with pytest.raises(ConfigError, match=message):
    objective.check_data(train, goal, examples)
  objective.check_data(train, goal, right)


def test_rows_hold_at_most_the_static_number_of_segments(prefs):
  """The bound the objectives' pair matrices are sized by (`pipeline.max_segments`): derived from
  the shortest response, or `data.max_segments`, which the packer keeps to; one pass each."""
  _, cfg, data = prefs
  derived = pipeline.max_segments(data, cfg.data)
  shortest = min(r.pairs for g in (*data.train, *data.eval) for r in g.responses)
  assert derived == 64 // shortest
  for cap, bound in ((0, derived), (3, 3)):
    batches = Batches(data.train, 4, 64, pack=True, seed=0, repeat=False, max_segments=cap)
    most, placed = 0, 0
    for _ in range(batches.batches_per_epoch().batches):
      b = next(batches)
      most = max(most, int(b.segment_ids.max()))
      placed += sum(len(set(b.groups[r].tolist()) - {0}) for r in range(4))
    assert most <= bound and placed == len(data.train)
  limited = dataclasses.replace(cfg.data, max_segments=3)
  assert pipeline.max_segments(data, limited) == 3
  with pytest.raises(ConfigError, match="data.max_segments=1 is below the 3 responses"):
    Batches(data.train, 4, 64, pack=True, seed=0, max_segments=1)
