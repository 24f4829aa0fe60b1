"""The verdict: one score, its uncertainty and a sentence, from the statistic that
predicted transfer efficiency best on the miniature Table 3 (``ftt-demo --matrix``;
docs/inspect.md).

The score is the efficiency the calibration curve predicts, 1 / (1 + (S / S50)^K), where
S = ‖M_t − M_s‖ / ‖Δ‖ over the whole model: how far the target lies from the source base,
in units of the delta. S50, K, the score's uncertainty (held-out RMS error) and the range of
pairs the calibration covered are read from verdict_calibration.json, which records the runs
that produced them; the fitting code is research code in benchmarks/. A pair outside that
range (statistic, scale, depth, dtype, a sparsified or sign-elected recipe) gets no confident level: the verdict says so.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cache
from pathlib import Path

STATISTIC_TEXT = "‖M_t − M_s‖ / ‖Δ‖"
LIKELY, UNLIKELY = 0.7, 0.3  # predicted efficiency at the two thresholds
CALIBRATION_FILE = Path(__file__).with_name("verdict_calibration.json")
OUT_OF_RANGE = "out of calibrated range"


@cache
def calibration() -> dict:
    """The shipped calibration (versioned; see its ``runs`` for where it comes from)."""
    return json.loads(CALIBRATION_FILE.read_text(encoding="utf-8"))


def predicted_efficiency(value: float, s50: float, k: float) -> float:
    return 1.0 / (1.0 + (value / s50) ** k)


def thresholds(s50: float | None = None, k: float | None = None) -> dict[str, float]:
    """Values of the statistic where the predicted efficiency is LIKELY and UNLIKELY."""
    curve = calibration()["curve"]
    s50 = curve["s50"] if s50 is None else s50
    k = curve["k"] if k is None else k

    def crossing(efficiency: float) -> float:
        return s50 * ((1 - efficiency) / efficiency) ** (1 / k)

    return {"likely_below": crossing(LIKELY), "unlikely_above": crossing(UNLIKELY)}


def out_of_range(statistics: dict, dtypes: set[str], delta_methods: Sequence[str]) -> list[str]:
    """Why this pair lies outside what the calibration covered (empty: inside)."""
    covered = calibration()["range"]
    reasons = [
        f"the recipe sets {method}; the calibration saw dense deltas" for method in delta_methods
    ]
    value = statistics["model"][statistics_key()]
    low, high = covered["statistic"]
    if value is not None and not low <= value <= high:
        reasons.append(f"{STATISTIC_TEXT} = {value:.3g} is outside the calibrated {low}-{high}")
    parameters = sum(_elements(t["shape"]) for t in statistics["tensors"])
    factor = covered["parameter_factor"]
    smallest, largest = covered["parameters"]
    if not smallest / factor <= parameters <= largest * factor:
        reasons.append(
            f"{parameters / 1e6:.3g}M parameters, against {smallest / 1e6:.2g}M in the calibration"
        )
    layers = len(statistics["layers"])
    if not covered["layers"][0] <= layers <= covered["layers"][1] * factor:
        reasons.append(f"{layers} layers, against {covered['layers'][0]} in the calibration")
    other = sorted(dtypes - set(covered["dtypes"]))
    if other:
        reasons.append(
            f"weights stored as {', '.join(other)}; the calibration saw {', '.join(covered['dtypes'])}"
        )
    return reasons


def statistics_key() -> str:
    return calibration()["statistic"]


def judge(
    statistics: dict,
    dtypes: set[str] = frozenset({"float32"}),
    delta_methods: Sequence[str] = (),
) -> dict:
    """The verdict on a report's ``statistics``; ``dtypes``: the inputs' stored dtypes;
    ``delta_methods``: the recipe's sparsification / consensus settings, if any."""
    shipped = calibration()
    value = statistics["model"][statistics_key()]
    limits = thresholds()
    runs = shipped["runs"]
    verdict = {
        "statistic": statistics_key(),
        "value": value,
        "thresholds": limits,
        "uncertainty": shipped["uncertainty"],
        "calibration_version": shipped["version"],
        "evidence": (
            f"{STATISTIC_TEXT} = {_shown(value)} over the whole model; thresholds "
            f"{limits['likely_below']:.2f} and {limits['unlikely_above']:.2f} calibrated on "
            f"{runs['pairs']} transfers of the {runs['model']}, seeds "
            f"{', '.join(map(str, runs['seeds']))}; score ± {shipped['uncertainty']:.2f} is the "
            "error on seeds the fit did not see (docs/inspect.md)"
        ),
    }
    if value is None:  # Δ = Σ α·(FT − M_s) = 0
        return {
            **verdict,
            "score": 0.0,
            "level": "nothing to transfer",
            "in_range": True,
            "out_of_range": [],
            "sentence": "The delta the merge adds is zero (every weight α is 0, or the "
            "fine-tuned model equals its source base): the merge would return the target "
            "unchanged.",
        }
    score = predicted_efficiency(value, **shipped["curve"])
    reasons = out_of_range(statistics, set(dtypes), delta_methods)
    if value <= limits["likely_below"]:
        level, sentence = (
            "likely",
            "Expect the transfer to work: the target lies closer to the source base than "
            "the fine-tuning moved it, like the checkpoint pairs of the miniature that kept "
            "most of what fine-tuning the target itself gives.",
        )
    elif value < limits["unlikely_above"]:
        level, sentence = (
            "partial",
            "Expect a partial transfer: the target lies about as far from the source base as "
            "the fine-tuning moved it; measure the merged model before relying on it.",
        )
    else:
        level, sentence = (
            "unlikely",
            "Expect the transfer to fail: the target lies much farther from the source base "
            "than the fine-tuning moved it, like the miniature's transfers across training "
            "stages, which kept little of what fine-tuning gives and can hurt the target.",
        )
    if reasons:
        sentence = (
            f"This pair lies outside what the verdict was calibrated on ({'; '.join(reasons)}), "
            f"so no level is given. On the miniature, this value would read '{level}'; "
            "measure the merged model."
        )
        return {
            **verdict,
            "score": score,
            "level": OUT_OF_RANGE,
            "level_on_miniature": level,
            "in_range": False,
            "out_of_range": reasons,
            "sentence": sentence,
        }
    return {
        **verdict,
        "score": score,
        "level": level,
        "in_range": True,
        "out_of_range": [],
        "sentence": sentence,
    }


def _elements(shape: list[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _shown(value: float | None) -> str:
    return "undefined (Δ = 0)" if value is None else f"{value:.3g}"
