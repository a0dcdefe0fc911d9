"""Held-out exact match (`train/held_out.py`) against hand counts."""

from jaxtune.data.formats import Conversation, Message
from jaxtune.train import held_out


def _conv(where: str, reference: str) -> Conversation:
  return Conversation((Message("user", "q"), Message("assistant", reference)), where)


def test_families_and_exact_match_by_hand():
  convs = [
    _conv("arithmetic[3]", "95"),
    _conv("arithmetic[7]", "12 + 3 = 15. So the answer is 15."),
    _conv("arithmetic[9]", "40"),
    _conv("sorting[0]", "1, 2, 3"),
    _conv("train.jsonl:12", "Paris"),
  ]
  answers = [" 95\n", "12 + 3 = 15. So the answer is 16.", "400", "1, 2, 3", "paris"]
  scores = held_out.score(convs, answers)
  # arithmetic: 1 of 3 (a near miss and a prefix match are wrong); sorting 1 of 1; the record
  # without a task name is family "all", and case counts.
  assert scores["exact_match"] == {"arithmetic": 1 / 3, "sorting": 1.0, "all": 0.0}
  assert scores["prompts"] == {"arithmetic": 3, "sorting": 1, "all": 1}
  assert scores["exact_match_all"] == 2 / 5
  assert held_out.metrics(scores)["held_out_exact_match/sorting"] == 1.0
