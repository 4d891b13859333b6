"""Task metrics on generated answers. Each knows whether higher is better.

`loss` and `kl` need no generation: they are computed through the streamed model
(evaluation/streamed.py) and only declared here so every metric has one description.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from surgeon.errors import InputError

MetricFunction = Callable[[list[str], list[str], list[str]], float]
RowFunction = Callable[[str, str], object]  # (answer, reference) -> what the aggregate reads of the row


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool
    generates: bool
    function: MetricFunction | None = None
    # A metric whose tuned value is 0 (kl) cannot have a relative floor: its drop is absolute.
    absolute_drop: bool = False
    # where the score is an aggregate of one value per row: what a bootstrap resamples (intervals.py)
    rows: RowFunction | None = None
    aggregate: Callable[[list], float] | None = None


def normalize(text: str) -> str:
    return " ".join(text.lower().split())


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else 0.0


def _by_row(row: RowFunction, aggregate: Callable[[list], float]) -> MetricFunction:
    return lambda prompts, answers, references: aggregate([row(a, r) for a, r in zip(answers, references)])


def _row_metric(name: str, row: RowFunction, aggregate: Callable[[list], float]) -> Metric:
    return Metric(name, True, True, _by_row(row, aggregate), rows=row, aggregate=aggregate)


def _exact(answer: str, reference: str) -> bool:
    return normalize(answer) == normalize(reference)


def _contains(answer: str, reference: str) -> bool:
    return normalize(reference) in normalize(answer)


def _f1(pairs: list[tuple[bool, bool]]) -> float:
    """F1 from (predicted, actual) pairs; with no true positive, 0 (undefined without positives)."""
    tp = sum(p and a for p, a in pairs)
    fp = sum(p and not a for p, a in pairs)
    fn = sum(a and not p for p, a in pairs)
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def _positive(label: str) -> RowFunction:
    """(predicted, actual) of `label` as the positive class, read from the start of the answer and the reference."""
    wanted = normalize(label)
    return lambda answer, reference: (normalize(answer).startswith(wanted), normalize(reference).startswith(wanted))


exact_match = _by_row(_exact, _mean)
contains = _by_row(_contains, _mean)


def f1_on_label(label: str) -> MetricFunction:
    """F1 of `label` as the positive class, read from the start of the answer and the reference.
    With no positive reference and no positive prediction, F1 is undefined and counted as 0."""
    return _by_row(_positive(label), _f1)


def _lcs(a: list[str], b: list[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        previous = 0
        for j, y in enumerate(b, 1):
            previous, row[j] = row[j], previous + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def _rouge_l_row(answer: str, reference: str) -> float:
    """ROUGE-L F-measure over lowercased whitespace tokens."""
    a, r = normalize(answer).split(), normalize(reference).split()
    common = _lcs(a, r)
    return 0.0 if common == 0 else 2 * common / (len(a) + len(r))


rouge_l = _by_row(_rouge_l_row, _mean)


_MEANS = {"exact_match": _exact, "contains": _contains, "rouge_l": _rouge_l_row}  # a mean of one score per row


def _user_function(spec: str) -> Metric:
    _, module_name, function_name = spec.split(":")
    try:
        user = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        raise InputError(f"cannot load metric function: {exc}", spec) from None
    if not callable(user):
        raise InputError(f"{module_name}.{function_name} is not a function", spec)

    def function(prompts, answers, references) -> float:
        # the user's code: what it raises, or returns other than a number, is the recipe's problem, in one line
        try:
            score = user(prompts, answers, references)
        except Exception as exc:
            raise InputError(f"the metric function failed ({type(exc).__name__}: {exc}); it takes (prompts, answers, references) "
                             "and returns a float", spec) from None
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise InputError(f"the metric function returned {type(score).__name__}, not a number", spec)
        return float(score)

    return Metric(spec, bool(getattr(user, "higher_is_better", True)), True, function)


def parse_metric(spec: str) -> Metric:
    """exact_match | contains | f1:<label> | rouge_l | loss | kl | python:module:function"""
    if spec in _MEANS:
        return _row_metric(spec, _MEANS[spec], _mean)
    if spec.startswith("f1:"):
        return _row_metric(spec, _positive(spec[3:]), _f1)
    if spec == "loss":
        return Metric(spec, False, False)
    if spec == "kl":
        return Metric(spec, False, False, absolute_drop=True)
    if spec.startswith("python:"):
        return _user_function(spec)
    raise InputError(f"unknown metric '{spec}'")
