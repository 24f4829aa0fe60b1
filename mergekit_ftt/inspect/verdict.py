"""The verdict: one score and a sentence, from the statistic that predicted transfer
efficiency best on the miniature Table 3 (``ftt-demo --matrix``; docs/inspect.md).

The score is the efficiency the calibration curve predicts, 1 / (1 + (S / S50)^K), where
S = ‖M_t − M_s‖ / ‖Δ‖ over the whole model: how far the target lies from the source base,
in units of the delta. S50 and K are a least-squares fit to the measured efficiencies of
every ordered pair of the miniature (CALIBRATION below); the two thresholds are the values
of S where the curve crosses 0.7 and 0.3. They are calibrated on a 0.2M-parameter model
and have not been checked on real 7-8B models.
"""

from __future__ import annotations

STATISTIC = "gap_to_delta"
STATISTIC_TEXT = "‖M_t − M_s‖ / ‖Δ‖"
LIKELY, UNLIKELY = 0.7, 0.3  # predicted efficiency at the two thresholds

# Fitted by mergekit_ftt.demo.calibration.fit_curve on `ftt-demo --matrix 3` (full
# preset, seeds 0-2, 60 ordered pairs, 200-question test; docs/inspect.md): RMS error 0.11,
# and 0.07-0.15 on each seed when fitted on the other two.
CALIBRATION = {
    "s50": 1.052,
    "k": 1.78,
    "evidence": "60 transfers between 5 checkpoints of a 0.2M-parameter OLMo 2, 3 seeds; "
    "Spearman ρ with measured efficiency 0.75 on average, 0.49-0.89 per seed",
}


def predicted_efficiency(value: float, s50: float, k: float) -> float:
    return 1.0 / (1.0 + (value / s50) ** k)


def thresholds(s50: float = CALIBRATION["s50"], k: float = CALIBRATION["k"]) -> dict[str, float]:
    """Values of the statistic where the predicted efficiency is LIKELY and UNLIKELY."""

    def crossing(efficiency: float) -> float:
        return s50 * ((1 - efficiency) / efficiency) ** (1 / k)

    return {"likely_below": crossing(LIKELY), "unlikely_above": crossing(UNLIKELY)}


def judge(statistics: dict) -> dict:
    """The verdict on a report's ``statistics`` (see the module docstring)."""
    model = statistics["model"]
    value = model[STATISTIC]
    limits = thresholds()
    verdict = {
        "statistic": STATISTIC,
        "value": value,
        "thresholds": limits,
        "evidence": (
            f"{STATISTIC_TEXT} = {_shown(value)} over the whole model; thresholds "
            f"{limits['likely_below']:.2f} and {limits['unlikely_above']:.2f} calibrated on the "
            f"miniature Table 3 ({CALIBRATION['evidence']}; docs/inspect.md)"
        ),
    }
    if value is None:  # Δ = 0
        return {
            **verdict,
            "score": 0.0,
            "level": "nothing to transfer",
            "sentence": "The fine-tuned model equals its source base: the delta is zero, and "
            "the merge would return the target unchanged.",
        }
    score = predicted_efficiency(value, CALIBRATION["s50"], CALIBRATION["k"])
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
    return {**verdict, "score": score, "level": level, "sentence": sentence}


def _shown(value: float | None) -> str:
    return "undefined (Δ = 0)" if value is None else f"{value:.3g}"
