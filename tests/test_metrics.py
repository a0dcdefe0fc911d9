"""The text metrics against values computed by hand on small literal inputs."""

import math

import pytest

from jaxtune.data import answers
from jaxtune.eval import metrics

# "a b a b a": 2-grams ab ba ab ba (2 unique of 4), 3-grams aba bab aba (2 of 3), 4-grams abab baba
# (2 of 2): rep-2 = 50, rep-3 = 100/3, rep-4 = 0; diversity = 1/2 * 2/3 * 1 = 1/3.
REPEATED = "a b a b a"


def test_repetition_rates():
  tokens = REPEATED.split()
  assert metrics.repetition(tokens, 2) == pytest.approx(50.0)
  assert metrics.repetition(tokens, 3) == pytest.approx(100 / 3)
  assert metrics.repetition(tokens, 4) == 0.0
  assert metrics.repetition(["x"], 2) is None


def test_log_diversity():
  assert metrics.log_diversity(REPEATED.split()) == pytest.approx(-math.log(1 - 1 / 3))
  assert metrics.log_diversity("a b c d".split()) == metrics.LOG_DIVERSITY_CAP  # No repeat.
  assert metrics.log_diversity("a b c".split()) is None  # No 4-gram.
  # "a a a a a": every rate is 100 * (1 - 1/k) for k n-grams: 3/4, 2/3, 1/2 -> diversity 1/24.
  assert metrics.log_diversity("a a a a a".split()) == pytest.approx(-math.log(1 - 1 / 24))


def test_generation_stats_average_over_responses():
  stats = metrics.generation_stats([REPEATED, "x  y", ""])
  assert stats["length_chars"] == pytest.approx((9 + 4 + 0) / 3)
  assert stats["length_words"] == pytest.approx((5 + 2 + 0) / 3)
  assert stats["rep_2"] == pytest.approx((50 + 0) / 2)  # "" has no 2-gram.
  assert stats["log_diversity"] == pytest.approx(-math.log(2 / 3))  # Only REPEATED has 4-grams.
  assert math.isnan(metrics.generation_stats([""])["rep_2"])


def test_longest_common_subsequence():
  assert metrics.lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # BCBA (CLRS 15.4).
  assert metrics.lcs_length([], list("abc")) == 0


def test_rouge_l():
  # LCS "the cat on the mat" = 5 of 6 tokens each way: P = R = F = 5/6.
  assert metrics.rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(
    100 * 5 / 6
  )
  # P = 2/2, R = 2/4: F = 2PR / (P + R) = 2/3. Case and punctuation do not count.
  assert metrics.rouge_l("The CAT!", "the big black cat") == pytest.approx(100 * 2 / 3)
  assert metrics.rouge_l("dog", "cat") == 0.0


def test_bleu_one_sentence():
  # Candidate a b c d x f vs a b c d e f: clipped precisions 5/6, 3/5, 2/4, 1/3; equal lengths.
  assert metrics.bleu(["a b c d x f"], ["a b c d e f"]) == pytest.approx(
    100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
  )


def test_bleu_corpus_brevity_penalty_and_clipping():
  # Sums over both pairs: 1-grams 9/10, 2-grams 6/8, 3-grams 4/6, 4-grams 2/4; candidates 10
  # tokens, references 12: brevity penalty exp(1 - 12/10).
  got = metrics.bleu(["a b c d x f", "p q r s"], ["a b c d e f", "p q r s t u"])
  assert got == pytest.approx(100 * math.exp(1 - 12 / 10) * (0.9 * 0.75 * 4 / 6 * 0.5) ** 0.25)
  # "the" four times against a reference with two: clipped to 2 of 4; longer than the reference.
  assert metrics.bleu(["the the the the"], ["the cat the"], max_n=1) == pytest.approx(50.0)
  # No 4-gram in common: 0 (no smoothing). Words and punctuation are separate tokens.
  assert metrics.bleu(["the cat sat on the mat"], ["the cat is on the mat"]) == 0.0
  assert metrics.bleu(["Hi, there."], ["Hi, there."]) == pytest.approx(100.0)
  with pytest.raises(ValueError, match="2 candidates but 1 references"):
    metrics.bleu(["a", "b"], ["a"])


def test_reference_scores():
  scores = metrics.reference_scores(["a b c d x f", "dog"], ["a b c d e f", "cat"])
  assert scores["rouge_l"] == pytest.approx((100 * 5 / 6 + 0) / 2)
  # "dog" adds one unmatched 1-gram to the corpus counts and no longer n-gram.
  assert scores["bleu"] == pytest.approx(100 * (5 / 7 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)


@pytest.mark.parametrize(
  "text, want",
  [("$1,234.50", "1234.5"), ("72.", "72"), (" 5.0 ", "5"), ("-3", "-3"), ("abc.", "abc")],
)
def test_normalize_number(text, want):
  assert answers.normalize_number(text) == want
