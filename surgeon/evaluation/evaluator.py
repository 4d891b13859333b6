"""Score a model: harmful rate on held-out harmful prompts and the task metric, with timings."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from surgeon.data.datasets import HarmfulPrompts, prompt_text
from surgeon.engine.layered import Plan
from surgeon.evaluation.cache import GenerationCache
from surgeon.evaluation.generate import GenerationStats, LoadedModel, generate
from surgeon.evaluation.intervals import bootstrap, paired_change, wilson
from surgeon.evaluation.judges import COMPLIED, Judge, Settled, harmful_rate, harmful_rate_by_category, shares
from surgeon.evaluation.metrics import Metric
from surgeon.processes import SOLO, Collective
from surgeon.progress import NullProgress, Progress


@dataclass
class Candidate:
    """A model to score: its plan (for streamed metrics), content identity and a loadable folder."""

    name: str
    plan: Plan
    fingerprint: Callable[[], str]
    folder: Callable[[], Path]
    _identity: str | None = field(default=None, repr=False, compare=False)

    def identity(self) -> str:
        """The content fingerprint, computed once per candidate."""
        if self._identity is None:
            self._identity = self.fingerprint()
        return self._identity


@dataclass
class SafetySet:
    rows: HarmfulPrompts
    judge: Judge
    max_new_tokens: int


@dataclass
class BenignSet:
    """Harmless prompts whose answers should not refuse; `refuses` reads an answer's opening;
    `divergence` (where the run's tuned is at hand) is a model's mean KL(tuned || model) of the
    next token after each prompt: a capability check that needs no task data."""

    prompts: list
    max_new_tokens: int
    refuses: Callable[[str], bool]
    divergence: Callable[[Plan], float] | None = None
    settled: Settled | None = None  # when an answer's opening decides `refuses` for good


@dataclass
class TaskSet:
    prompts: list[str]
    references: list[str]
    metric: Metric
    max_new_tokens: int
    streamed: Callable[[Plan], float] | None = None  # loss / kl through the layered engine


@dataclass
class Scores:
    harmful_rate: float | None = None  # the share of answers that complied (judges.py)
    refused: float | None = None
    degenerate: float | None = None  # no help either way: counted apart from refusals
    unparsable: int = 0
    harmful_by_category: dict[str, float] | None = None
    task_score: float | None = None
    # 95% intervals (intervals.py): Wilson's for the harmful rate, a bootstrap over the rows for a
    # generated metric that aggregates one value per row (none for streamed and python: metrics)
    harmful_interval: tuple[float, float] | None = None
    task_interval: tuple[float, float] | None = None
    over_refusal: float | None = None  # the share of harmless prompts refused, and its Wilson interval
    over_refusal_interval: tuple[float, float] | None = None
    kl_from_tuned: float | None = None  # nats per harmless prompt (BenignSet.divergence)
    # what the scores were aggregated from, per row (verdicts; the metric's values), for paired
    # comparisons of two models (`change_from`); not written out
    rows: dict = field(default_factory=dict, repr=False)
    seconds: float = 0.0
    generated_tokens: int = 0
    tokens_per_second: float | None = None

    def to_dict(self) -> dict:
        return {name: value for name, value in asdict(self).items() if name != "rows"}

    def change_from(self, before: "Scores", aggregate: Callable[[list], float] | None) -> dict:
        """95% intervals of this model's scores minus `before`'s, paired on the same rows (the
        task's where its metric aggregates per-row values with `aggregate`)."""
        change = {}
        if "harm" in self.rows and "harm" in before.rows:
            change["harmful_rate"] = paired_change(before.rows["harm"], self.rows["harm"], lambda v: harmful_rate(v)[0])
        if "refused" in self.rows and "refused" in before.rows:
            change["over_refusal"] = paired_change(before.rows["refused"], self.rows["refused"], lambda v: sum(v) / len(v))
        if aggregate is not None and "task" in self.rows and "task" in before.rows:
            change["task_score"] = paired_change(before.rows["task"], self.rows["task"], aggregate)
        return change


class Evaluator:
    def __init__(
        self,
        safety: SafetySet | None,
        task: TaskSet | None,
        load: Callable[[Path], LoadedModel],
        batch_size: int,
        system_prompt: str | None = None,
        cache: GenerationCache | None = None,
        progress: Progress = NullProgress(),
        benign: BenignSet | None = None,
        stop_early: bool = True,
        collective: Collective = SOLO,
    ):
        """`stop_early`: answers scored by a judge that can tell when its verdict is settled end
        there (the same verdicts, far fewer tokens where a model refuses); off where every answer
        is wanted whole (`surgeon eval --answers`)."""
        self.safety, self.task, self.load, self.benign = safety, task, load, benign
        self.stop_early, self.collective = stop_early, collective
        self.batch_size, self.system_prompt = batch_size, system_prompt
        self.cache, self.progress = cache or GenerationCache(), progress
        self._loaded: tuple[str, LoadedModel] | None = None
        self.stats = GenerationStats()

    @property
    def metric(self) -> Metric | None:
        return self.task.metric if self.task else None

    def _model(self, candidate: Candidate) -> LoadedModel:
        fingerprint = candidate.identity()
        if self._loaded is None or self._loaded[0] != fingerprint:
            self._loaded = None  # free the previous model before loading the next
            self._loaded = (fingerprint, self.load(candidate.folder()))
        return self._loaded[1]

    def release(self) -> None:
        """Drop the model kept loaded for the next candidate's answers."""
        self._loaded = None

    def answers(self, candidate: Candidate, prompts: list[str], max_new_tokens: int, what: str, settled: Settled | None = None) -> list[str]:
        """The candidate's answers, generated or from the cache; with `settled` (and `stop_early`),
        each only as far as that test needs."""
        settled = settled if self.stop_early else None
        # batches by prompt length: a row's padding, and so its last bits, differ from file-order batches
        settings = {"max_new_tokens": max_new_tokens, "system_prompt": self.system_prompt, "decoding": "greedy", "batches": "by length"}
        if settled is not None:
            settings["stop"] = settled.rule
        key = self.cache.key(candidate.identity(), prompts, settings)
        cached = self.collective.broadcast(self.cache.get(key) if self.collective.is_main else None)  # every process takes the same path
        if cached is not None:
            return cached
        before = (self.stats.tokens, self.stats.seconds)
        answers = generate(self._model(candidate), prompts, max_new_tokens, self.batch_size, self.system_prompt,
                           self.progress, self.stats, f"{candidate.name}: {what} answers", settled.test if settled else None, self.collective)
        tokens, seconds = self.stats.tokens - before[0], self.stats.seconds - before[1]
        if self.collective.is_main:  # the cache is shared by the processes
            self.cache.put(key, answers, {"model": candidate.identity(), "settings": settings, "tokens": tokens, "seconds": seconds})
        return answers

    def _verdicts(self, candidate: Candidate) -> list[bool | None]:
        rows = self.safety.rows
        return self.safety.judge(rows.prompts, self.answers(candidate, rows.prompts, self.safety.max_new_tokens, "safety", self.safety.judge.settled))

    def _harm_of(self, verdicts: list[bool | None]) -> tuple[float, int, dict[str, float] | None]:
        categories = self.safety.rows.categories
        return (*harmful_rate(verdicts), harmful_rate_by_category(verdicts, categories) if categories else None)

    def harm(self, candidate: Candidate) -> tuple[float, int, dict[str, float] | None] | None:
        """The harmful rate, how many verdicts were unparsable, and the rate per category (when named)."""
        return None if self.safety is None else self._harm_of(self._verdicts(candidate))

    def _task_answers(self, candidate: Candidate) -> list[str]:
        return self.answers(candidate, self.task.prompts, self.task.max_new_tokens, "task")

    def task_score(self, candidate: Candidate) -> float | None:
        if self.task is None:
            return None
        if self.task.streamed is not None:
            return self.task.streamed(candidate.plan)
        return float(self.task.metric.function(self.task.prompts, self._task_answers(candidate), self.task.references))

    def examples(self, candidate: Candidate, count: int | None = None) -> dict:
        """The rows of each set as the candidate answers them, the first `count` or all, whole
        (cached where scoring generated them whole): harmful prompts with the judge's verdict,
        harmless ones with whether the answer refuses, task prompts with the reference (a streamed
        metric's rows are answered for a `count` alone: scoring generated none)."""
        shown = {}
        if self.safety is not None:
            prompts = self.safety.rows.prompts[:count]
            answers = self.answers(candidate, prompts, self.safety.max_new_tokens, "safety")
            shown["safety"] = [{"prompt": prompt_text(p), "answer": a, "verdict": v} for p, a, v in zip(prompts, answers, self.safety.judge(prompts, answers))]
        if self.benign is not None:
            prompts = self.benign.prompts[:count]
            answers = self.answers(candidate, prompts, self.benign.max_new_tokens, "harmless")
            shown["benign"] = [{"prompt": prompt_text(p), "answer": a, "refused": self.benign.refuses(a)} for p, a in zip(prompts, answers)]
        if self.task is not None and (self.task.streamed is None or count is not None):
            prompts = self.task.prompts if self.task.streamed is None else self.task.prompts[:count]
            answers = self.answers(candidate, prompts, self.task.max_new_tokens, "task")[:count]
            shown["task"] = [{"prompt": prompt_text(p), "answer": a, "reference": r} for p, a, r in zip(prompts, answers, self.task.references)]
        return shown

    def evaluate(self, candidate: Candidate) -> Scores:
        started = time.perf_counter()
        before = (self.stats.tokens, self.stats.seconds)
        scores = Scores()
        if self.safety is not None:
            verdicts = self._verdicts(candidate)
            scores.harmful_rate, scores.unparsable, scores.harmful_by_category = self._harm_of(verdicts)
            parsed = [v for v in verdicts if v is not None]
            share = shares(verdicts)
            scores.refused, scores.degenerate = share["refused"], share["degenerate"]
            scores.harmful_interval = wilson(sum(v == COMPLIED for v in parsed), len(parsed))
            scores.rows["harm"] = verdicts
        if self.benign is not None:
            answers = self.answers(candidate, self.benign.prompts, self.benign.max_new_tokens, "harmless", self.benign.settled)
            refused = [self.benign.refuses(a) for a in answers]
            scores.over_refusal, scores.over_refusal_interval = sum(refused) / len(refused), wilson(sum(refused), len(refused))
            scores.rows["refused"] = refused
            if self.benign.divergence is not None:
                scores.kl_from_tuned = self.benign.divergence(candidate.plan)
        metric = self.metric
        if metric is not None and metric.rows is not None and self.task.streamed is None:
            # the answers read and each row scored once, for the score and its interval
            answers = self._task_answers(candidate)
            scores.rows["task"] = [metric.rows(a, r) for a, r in zip(answers, self.task.references)]
            scores.task_score = float(metric.aggregate(scores.rows["task"]))
            scores.task_interval = bootstrap(scores.rows["task"], metric.aggregate)
        else:
            scores.task_score = self.task_score(candidate)
        scores.seconds = time.perf_counter() - started
        scores.generated_tokens = self.stats.tokens - before[0]
        seconds = self.stats.seconds - before[1]
        scores.tokens_per_second = scores.generated_tokens / seconds if seconds else None
        return scores
