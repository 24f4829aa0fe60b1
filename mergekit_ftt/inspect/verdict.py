"""The verdict: one score and a sentence, from the statistic that predicted transfer
efficiency best on the miniature Table 3 (``ftt-demo --matrix``, docs/inspect.md).

PROVISIONAL: thresholds to be calibrated.
"""

from __future__ import annotations

STATISTIC = "gap_to_delta"


def judge(statistics: dict) -> dict:
    value = statistics["model"][STATISTIC]
    score = 0.0 if value is None else 1.0 / (1.0 + value)
    level = "likely" if score > 0.5 else "unlikely"
    return {
        "score": score,
        "level": level,
        "statistic": STATISTIC,
        "value": value,
        "sentence": "provisional",
        "evidence": "provisional",
        "thresholds": {},
    }
