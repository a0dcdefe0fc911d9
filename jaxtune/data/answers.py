"""Final answers of worked solutions: a number in a canonical form, and the final number of a
GSM8K-style solution. The eval benchmarks (`eval/gsm8k.py`) and PPO's programmatic rewards
(`train/rewards.py`) both read answers this way.

The final number of a solution is the number after "####", else after "the answer is", else the
last number in the text; numbers compare in canonical form ("1,000" = "1000", "5.0" = "5").
"""

from __future__ import annotations

import re

NUMBER = r"-?[$]?\d[\d,]*(?:\.\d+)?"


def normalize_number(text: str) -> str:
  """A numeric answer in a canonical form: "$1,234.50" -> "1234.5", "72." -> "72"; other text
  stripped of surrounding spaces and a final period."""
  text = text.strip().rstrip(".").strip()
  plain = text.replace(",", "").replace("$", "")
  if not re.fullmatch(r"-?(\d+\.?\d*|\.\d+)", plain):
    return text
  value = float(plain)
  return str(int(value)) if value.is_integer() else repr(value)


def final_number(text: str) -> str:
  """The final number of a worked solution (see the module docstring), normalized; "" if none."""
  for pattern in (rf"####\s*({NUMBER})", rf"answer is\s*:?\s*({NUMBER})"):
    found = re.findall(pattern, text, flags=re.IGNORECASE)
    if found:
      return normalize_number(found[-1])
  numbers = re.findall(NUMBER, text)
  return normalize_number(numbers[-1]) if numbers else ""
