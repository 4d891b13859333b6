"""How far a score measured on a few hundred rows can be trusted: 95% intervals, so that a table
of models says which of their differences the rows can resolve."""

from __future__ import annotations

import math
import random
from typing import Callable, Sequence

Z95 = 1.959963984540054  # the normal quantile of 0.975
RESAMPLES = 1000


def wilson(hits: int, total: int) -> tuple[float, float] | None:
    """The Wilson score interval of a proportion (a harmful rate): sound at 0 and at every hit,
    where the normal approximation collapses to a point."""
    if total <= 0:
        return None
    share, z2 = hits / total, Z95**2
    centre = (share + z2 / (2 * total)) / (1 + z2 / total)
    half = Z95 * math.sqrt(share * (1 - share) / total + z2 / (4 * total**2)) / (1 + z2 / total)
    return (0.0 if hits == 0 else centre - half), (1.0 if hits == total else centre + half)


def bootstrap(rows: Sequence, aggregate: Callable[[list], float], resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float] | None:
    """The percentile interval of aggregate(rows) over rows drawn with replacement. The seed is
    fixed: every model of a table is resampled at the same row positions."""
    if not rows:
        return None
    draw = random.Random(seed)
    values = sorted(aggregate([rows[draw.randrange(len(rows))] for _ in rows]) for _ in range(resamples))
    return values[round(0.025 * (resamples - 1))], values[round(0.975 * (resamples - 1))]
