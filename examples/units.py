"""Answers with units, checked by your own code: a plug-in for ttrl's answer extraction,
equivalence and reward (see ttrl/plugins.py for the signatures).

    ttrl train --config demo data.train=lengths.jsonl \
        data.answer_extractor=examples/units.py:extract \
        data.answer_equivalence=examples/units.py:equivalent \
        reward.kind=examples/units.py:agree_with_units

"120 cm", "1.2 m" and "1200 mm" are one answer to the vote, to the reward and to evaluation;
"1.2" without a unit is no answer at all.
"""

import re

METRES = {"mm": 0.001, "cm": 0.01, "m": 1.0, "km": 1000.0}
LENGTH = re.compile(r"(-?\d+(?:\.\d+)?)\s*(mm|cm|km|m)\b")


def extract(text: str) -> str | None:
    """The last length with a unit in the text, as "<number> <unit>" (None: there is none)."""
    found = LENGTH.findall(text)
    return f"{found[-1][0]} {found[-1][1]}" if found else None


def metres(answer: str) -> float | None:
    m = LENGTH.fullmatch(answer.strip())
    return float(m.group(1)) * METRES[m.group(2)] if m else None


def equivalent(a: str, b: str) -> bool:
    """The same length, whatever the units (to a millionth of a metre)."""
    x, y = metres(a), metres(b)
    return x is not None and y is not None and abs(x - y) < 1e-6


def agree_with_units(vote, texts: list[str], indices: list[int]) -> list[float]:
    """TTRL's majority reward, less 0.5 for an answer in agreement that writes the length in another
    unit than the pseudo-label's (one way of asking for a consistent unit)."""
    label = vote.pseudo_label
    out = []
    for i in indices:
        agrees = vote.winner >= 0 and vote.cluster_of[i] == vote.winner
        answer = extract(texts[i]) if agrees else None
        out.append(0.0 if not agrees else 1.0 if answer.split()[-1] == label.split()[-1] else 0.5)
    return out
