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


def _percentiles(values: list[float]) -> tuple[float, float]:
    values = sorted(values)
    return values[round(0.025 * (len(values) - 1))], values[round(0.975 * (len(values) - 1))]


def _draws(rows: int, resamples: int, seed: int):
    """Row positions drawn with replacement, `resamples` times; the seed is fixed, so every model
    of a table is resampled at the same positions."""
    draw = random.Random(seed)
    for _ in range(resamples):
        yield [draw.randrange(rows) for _ in range(rows)]


def bootstrap(rows: Sequence, aggregate: Callable[[list], float], resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float] | None:
    """The percentile interval of aggregate(rows) over rows drawn with replacement."""
    if not rows:
        return None
    return _percentiles([aggregate([rows[i] for i in positions]) for positions in _draws(len(rows), resamples, seed)])


def paired_change(before: Sequence, after: Sequence, aggregate: Callable[[list], float], resamples: int = RESAMPLES,
                  seed: int = 0) -> tuple[float, float] | None:
    """The percentile interval of aggregate(after) - aggregate(before), two models' values on the
    same rows drawn together: their rows' shared difficulty cancels, so it is narrower than the
    two models' own intervals suggest."""
    if not before or len(before) != len(after):
        return None
    return _percentiles([aggregate([after[i] for i in positions]) - aggregate([before[i] for i in positions])
                         for positions in _draws(len(before), resamples, seed)])
