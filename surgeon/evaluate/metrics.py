"""Task metrics on generated answers. Each knows whether higher is better.

`loss` and `kl` need no generation: they are computed through the streamed model
(evaluate/task_loss.py) and only declared here so every metric has one description.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from surgeon.errors import InputError

MetricFunction = Callable[[list[str], list[str], list[str]], float]


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool
    generates: bool
    function: MetricFunction | None = None
    # A metric whose tuned value is 0 (kl) cannot have a relative floor: its drop is absolute.
    absolute_drop: bool = False


def normalize(text: str) -> str:
    return " ".join(text.lower().split())


def exact_match(prompts, answers, references) -> float:
    return _mean(normalize(a) == normalize(r) for a, r in zip(answers, references))


def contains(prompts, answers, references) -> float:
    return _mean(normalize(r) in normalize(a) for a, r in zip(answers, references))


def f1_on_label(label: str) -> MetricFunction:
    """F1 of `label` as the positive class, read from the start of the answer and the reference.
    With no positive reference and no positive prediction, F1 is undefined and counted as 0."""
    wanted = normalize(label)

    def f1(prompts, answers, references) -> float:
        predicted = [normalize(a).startswith(wanted) for a in answers]
        actual = [normalize(r).startswith(wanted) for r in references]
        tp = sum(p and a for p, a in zip(predicted, actual))
        fp = sum(p and not a for p, a in zip(predicted, actual))
        fn = sum(a and not p for p, a in zip(predicted, actual))
        return 2 * tp / (2 * tp + fp + fn) if tp else 0.0

    return f1


def _lcs(a: list[str], b: list[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        previous = 0
        for j, y in enumerate(b, 1):
            previous, row[j] = row[j], previous + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(prompts, answers, references) -> float:
    """Mean ROUGE-L F-measure over lowercased whitespace tokens."""
    scores = []
    for answer, reference in zip(answers, references):
        a, r = normalize(answer).split(), normalize(reference).split()
        common = _lcs(a, r)
        scores.append(0.0 if common == 0 else 2 * common / (len(a) + len(r)))
    return _mean(scores)


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else 0.0


def _user_function(spec: str) -> Metric:
    _, module_name, function_name = spec.split(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        raise InputError(f"cannot load metric function: {exc}", spec) from None
    return Metric(spec, bool(getattr(function, "higher_is_better", True)), True, function)


def parse_metric(spec: str) -> Metric:
    """exact_match | contains | f1:<label> | rouge_l | loss | kl | python:module:function"""
    if spec == "exact_match":
        return Metric(spec, True, True, exact_match)
    if spec == "contains":
        return Metric(spec, True, True, contains)
    if spec == "rouge_l":
        return Metric(spec, True, True, rouge_l)
    if spec.startswith("f1:"):
        return Metric(spec, True, True, f1_on_label(spec[3:]))
    if spec == "loss":
        return Metric(spec, False, False)
    if spec == "kl":
        return Metric(spec, False, False, absolute_drop=True)
    if spec.startswith("python:"):
        return _user_function(spec)
    raise InputError(f"unknown metric '{spec}'")
