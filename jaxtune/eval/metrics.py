"""Text metrics of generated responses: the NEFTune paper's length and diversity statistics,
ROUGE-L and BLEU against references (final answers: `data/answers.py`).

Length and diversity (Jain et al. 2023, NEFTune, Section 5, who follow Kirchenbauer et al. 2023
and Li et al. 2022), on whitespace tokens (`str.split`), per response:

- rep-n = 100 * (1 - |unique n-grams| / |n-grams|), the n-gram repetition rate in percent;
- diversity = prod_{n=2..4} (1 - rep-n / 100);
- log-diversity = -ln(1 - diversity), capped at 20 (Kirchenbauer et al.'s cap) for a response
  with no repeated n-gram, where 1 - diversity = 0.

Each is averaged over the responses where it is defined (rep-n: at least n tokens; diversity:
at least 4). Note: Kirchenbauer et al.'s released code takes rep-n as a fraction and still divides
it by 100, which pushes diversity towards 1 and log-diversity up; the values here follow the
written definition and are not comparable to numbers produced that way.

ROUGE-L (Lin 2004): the F1 of the longest common subsequence, on lowercased alphanumeric tokens,
per response, averaged, in percent. BLEU (Papineni et al. 2002): corpus BLEU-4 over all responses
(one reference each), uniform weights, brevity penalty, no smoothing (0 when some n-gram order
has no match), on case-sensitive word and punctuation tokens, in percent.
"""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Sequence

LOG_DIVERSITY_CAP = 20.0


def _ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
  return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def repetition(tokens: Sequence[str], n: int) -> float | None:
  """rep-n in percent; None with fewer than n tokens."""
  grams = _ngrams(tokens, n)
  return 100.0 * (1.0 - len(set(grams)) / len(grams)) if grams else None


def log_diversity(tokens: Sequence[str]) -> float | None:
  """-ln(1 - prod_{n=2..4} (1 - rep-n / 100)), capped; None with fewer than 4 tokens."""
  reps = [repetition(tokens, n) for n in (2, 3, 4)]
  if any(r is None for r in reps):
    return None
  diversity = math.prod(1.0 - r / 100.0 for r in reps)
  if diversity >= 1.0:
    return LOG_DIVERSITY_CAP
  return min(-math.log(1.0 - diversity), LOG_DIVERSITY_CAP)


def _mean(values: Sequence[float | None]) -> float:
  defined = [v for v in values if v is not None]
  return sum(defined) / len(defined) if defined else math.nan


def generation_stats(responses: Sequence[str]) -> dict[str, float]:
  """Average length (characters, whitespace tokens), 2-gram repetition and log-diversity."""
  tokens = [r.split() for r in responses]
  return {
    "length_chars": _mean([len(r) for r in responses]),
    "length_words": _mean([len(t) for t in tokens]),
    "rep_2": _mean([repetition(t, 2) for t in tokens]),
    "log_diversity": _mean([log_diversity(t) for t in tokens]),
  }


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
  """Length of the longest common subsequence (dynamic programming, one row at a time)."""
  row = [0] * (len(b) + 1)
  for x in a:
    diagonal = 0
    for j, y in enumerate(b, 1):
      diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
  return row[-1]


def rouge_l(candidate: str, reference: str) -> float:
  """ROUGE-L F1 in percent of one response."""
  c, r = (re.findall(r"[a-z0-9]+", s.lower()) for s in (candidate, reference))
  lcs = lcs_length(c, r)
  if lcs == 0:
    return 0.0
  precision, recall = lcs / len(c), lcs / len(r)
  return 100.0 * 2 * precision * recall / (precision + recall)


def bleu(candidates: Sequence[str], references: Sequence[str], max_n: int = 4) -> float:
  """Corpus BLEU in percent: clipped n-gram precisions summed over the corpus, their geometric
  mean, times the brevity penalty exp(1 - r / c) when the candidates are shorter (c < r)."""
  if len(candidates) != len(references):
    raise ValueError(f"{len(candidates)} candidates but {len(references)} references")
  matches, totals = [0] * max_n, [0] * max_n
  c_len = r_len = 0
  for candidate, reference in zip(candidates, references, strict=True):
    c, r = (re.findall(r"\w+|[^\w\s]", s) for s in (candidate, reference))
    c_len, r_len = c_len + len(c), r_len + len(r)
    for n in range(1, max_n + 1):
      counts, ref_counts = collections.Counter(_ngrams(c, n)), collections.Counter(_ngrams(r, n))
      matches[n - 1] += sum(min(k, ref_counts[g]) for g, k in counts.items())
      totals[n - 1] += max(len(c) - n + 1, 0)
  if min(matches) == 0:
    return 0.0
  log_precision = sum(math.log(m / t) for m, t in zip(matches, totals, strict=True)) / max_n
  brevity = 1.0 if c_len > r_len else math.exp(1 - r_len / c_len)
  return 100.0 * brevity * math.exp(log_precision)


def reference_scores(responses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
  return {
    "rouge_l": _mean([rouge_l(c, r) for c, r in zip(responses, references, strict=True)]),
    "bleu": bleu(responses, references),
  }
