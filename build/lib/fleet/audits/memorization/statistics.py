"""Statistics of a cell of canaries: a mean with its interval, and a test against the control group.

A cell is a handful of canaries (8 by default) and one training run, so a mean alone cannot tell
memorization from chance: chance itself gives each canary an exposure of about 1/ln 2 bits on
average with a spread as large (its rank among the candidates is uniform). Each cell therefore
carries a 95% interval and is compared with the control group, canaries drawn the same way and
never planted, scored under the same model.
"""

from __future__ import annotations

import math

import numpy as np

# Mean exposure by rank of a canary the model has never seen: its rank among |R| candidates is
# uniform, and E[log2 |R| - log2 rank] tends to 1/ln 2 as |R| grows.
CHANCE_BITS = 1.0 / math.log(2.0)
ALPHA = 0.05
INTERVAL = "Student t 95% interval of the mean"
TEST = "one-sided Mann-Whitney U against the control group"


def mean_interval(values: np.ndarray) -> tuple[float, float, float]:
    """(mean, low, high): the Student t 95% interval of the mean (NaN bounds below 2 values)."""
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    mean = float(np.mean(x)) if len(x) else math.nan
    if len(x) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(1 - ALPHA / 2, len(x) - 1) * np.std(x, ddof=1) / math.sqrt(len(x)))
    return mean, mean - half, mean + half


def above_control(values: np.ndarray, control: np.ndarray) -> float:
    """p-value that the cell's exposures are stochastically greater than the control's.

    Mann-Whitney U, one-sided: no normality assumed (exposure by rank is bounded and piles up at
    log2|R| once canaries are memorized), and ties, which saturation makes common, are handled.
    NaN when either side is empty.
    """
    from scipy import stats

    if len(values) == 0 or len(control) == 0:
        return math.nan
    return float(stats.mannwhitneyu(values, control, alternative="greater").pvalue)
