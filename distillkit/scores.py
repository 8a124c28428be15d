"""Scores of a synthetic set against the random real subset of the same size and the full training split.

Accuracies are the means over evaluation runs, in percent; every score is computed per evaluator model from
rows of one protocol (its settings equal), with ``hard`` meaning the protocol's hard-label counterpart (for
a hard-label protocol, itself):

* ``improvement_over_random`` (IOR): synthetic minus random, under the row's own protocol, in points.
* ``hard_label_recovery``: the share of the hard-label gap from random to full data that the set closes,
  ``(syn_hard - random_hard) / (full - random_hard)``: 0 is no better than random, 1 is full-data accuracy.
* ``hard_label_gap`` (DD-Ranking's HLR): full minus synthetic, hard labels, in points.
* ``label_robust_score`` (DD-Ranking's LRS, Li et al. 2025, "DD-Ranking: Rethinking the Evaluation of Dataset
  Distillation"): ``(e^a - e^-1) / (e - e^-1)`` with ``a = w * IOR - (1 - w) * HLR``, ``w = 0.5``, IOR and HLR
  as fractions of 1, so the score lies in [0, 1] as the paper defines it. (DD-Ranking's code at b8b0966,
  ``ddranking/metrics/{hard,soft}_label.py``, feeds percentages into the exponent; and its accuracies are
  the best epoch after a learning-rate search on the test set, where distillkit's are final iterates under
  a fixed recipe, so the numbers are not interchangeable with its leaderboard's.)

The full-data accuracy is :func:`distillkit.references.full_data_accuracy` (its epochs are recorded with it).
"""

from __future__ import annotations

import math

#: DD-Ranking's default weight of IOR against HLR in the label-robust score
LRS_WEIGHT = 0.5
#: the scores of a row, in the order eval.csv and tables show them
SCORES = ("improvement_over_random", "hard_label_recovery", "hard_label_gap", "label_robust_score")


def label_robust_score(improvement: float, gap: float, weight: float = LRS_WEIGHT) -> float:
    """DD-Ranking's LRS from IOR and HLR given in points (converted to fractions of 1 here)."""
    alpha = weight * improvement / 100 - (1 - weight) * gap / 100
    return (math.exp(alpha) - math.exp(-1)) / (math.e - math.exp(-1))


def scores(synthetic: float, random: float, synthetic_hard: float | None, random_hard: float | None,
           full: float | None) -> dict[str, float | None]:
    """Every score of one (model, protocol); those needing a missing input are None."""
    improvement = synthetic - random
    out: dict[str, float | None] = {**dict.fromkeys(SCORES), "improvement_over_random": improvement}
    if full is not None and synthetic_hard is not None:
        gap = full - synthetic_hard
        out["hard_label_gap"] = gap
        out["label_robust_score"] = label_robust_score(improvement, gap)
        if random_hard is not None and full != random_hard:
            out["hard_label_recovery"] = (synthetic_hard - random_hard) / (full - random_hard)
    return out
