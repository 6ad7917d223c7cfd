"""Draw which vertebrae of a synthetic study are fractured, following the real RSNA label statistics."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from rsna_cspine.constants import REAL_PREVALENCE, VERTEBRAE

#: Fractured vertebrae per positive study in the real train.csv (DESIGN.md): count → studies.
REAL_FRACTURES_PER_POSITIVE: dict[int, int] = {1: 623, 2: 239, 3: 64, 4: 26, 5: 7, 6: 2}


@lru_cache(maxsize=1)
def selection_weights() -> tuple[float, ...]:
    """Weights for drawing vertebrae one by one without replacement inside a positive study.

    Drawing in proportion to the raw prevalences would under-select the common vertebrae once a study
    has several fractures, so the weights are fitted (fixed-point iteration on the exact inclusion
    probabilities) until every vertebra's inclusion probability given "positive" equals its real
    ``prevalence / patient_prevalence``. Written by hand: no library samples with a prescribed count
    distribution and prescribed inclusion probabilities.
    """
    target = np.array([REAL_PREVALENCE[v] for v in VERTEBRAE]) / REAL_PREVALENCE["patient_overall"]
    weights = target / target.sum()
    for _ in range(300):
        inclusion = _inclusion_probabilities(weights)
        if np.abs(inclusion / target - 1.0).max() < 1e-9:
            break
        weights = weights * target / inclusion
        weights /= weights.sum()
    return tuple(float(w) for w in weights)


def _inclusion_probabilities(weights: np.ndarray) -> np.ndarray:
    """P(vertebra chosen | positive) under sequential weighted draws, by dynamic programming on subsets."""
    n = len(weights)
    bits = _subset_bits(n)  # (2**n, n) membership matrix
    counts = sorted(REAL_FRACTURES_PER_POSITIVE)
    count_prob = np.array([REAL_FRACTURES_PER_POSITIVE[c] for c in counts], dtype=float)
    count_prob /= count_prob.sum()
    chosen_weight = bits @ weights
    total = weights.sum()
    # reach[mask] = probability that the first popcount(mask) draws are exactly the set `mask`.
    reach = np.zeros(1 << n)
    reach[0] = 1.0
    for mask in range(1, 1 << n):
        for k in np.flatnonzero(bits[mask]):
            prev = mask ^ (1 << k)
            reach[mask] += reach[prev] * weights[k] / (total - chosen_weight[prev])
    size = bits.sum(axis=1)
    per_size = np.zeros(1 << n)
    for count, prob in zip(counts, count_prob):
        per_size[size == count] = prob
    return (per_size * reach) @ bits


@lru_cache(maxsize=None)
def _subset_bits(n: int) -> np.ndarray:
    return np.array([[mask >> k & 1 for k in range(n)] for mask in range(1 << n)], dtype=float)


def sample_fracture_labels(rng: np.random.Generator, prevalence_scale: float = 1.0) -> dict[str, int]:
    """Draw ``{"C1": 0/1, ..., "C7": 0/1}`` with the real prevalences times ``prevalence_scale``.

    A study is positive with probability ``min(1, scale × 961/2019)``; a positive study gets a number
    of fractured vertebrae from the real 1…6 distribution, chosen with ``selection_weights``. The
    per-vertebra marginals are therefore the real prevalences times the scale until the patient
    probability saturates at 1 (scale ≈ 2.1), beyond which they stop growing.

    Args:
        rng: random generator (consumed a fixed number of times per call only when positive).
        prevalence_scale: multiplier of the real prevalences.

    Returns:
        One 0/1 entry per cervical vertebra.
    """
    labels = {name: 0 for name in VERTEBRAE}
    p_positive = min(1.0, prevalence_scale * REAL_PREVALENCE["patient_overall"])
    if rng.random() >= p_positive:
        return labels
    counts = sorted(REAL_FRACTURES_PER_POSITIVE)
    count_prob = np.array([REAL_FRACTURES_PER_POSITIVE[c] for c in counts], dtype=float)
    n_fractured = int(rng.choice(counts, p=count_prob / count_prob.sum()))
    available = np.array(selection_weights())
    for _ in range(n_fractured):
        k = int(rng.choice(len(VERTEBRAE), p=available / available.sum()))
        labels[VERTEBRAE[k]] = 1
        available[k] = 0.0
    return labels
