"""Build the evaluation of a recipe: judge, task set, candidates (base, tuned, checkpoints)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Callable

import torch

from surgeon.engine.layered import BASE, TUNED, Plan
from surgeon.engine.masks import MaskSet
from surgeon.errors import InputError, NonFiniteError
from surgeon.io.fingerprint import combine, file_sha256, folder_fingerprint
from surgeon.data.datasets import HarmfulPrompts, prompt_text
from surgeon.evaluation.evaluator import Candidate, Evaluator, SafetySet, TaskSet
from surgeon.evaluation.generate import LoadedModel, generate, load_for_generation
from surgeon.evaluation.judges import ClassifierJudge, GuardJudge, HarmBenchPrefixJudge, Judge, RefusalJudge
from surgeon.evaluation.metrics import parse_metric
from surgeon.io.references import ResolvedModel, resolve_model
from surgeon.processes import SOLO, Collective
from surgeon.recipe.schema import SafetyEvalSet

GUARD_NEW_TOKENS = 16


def _guard_generate(folder: Path, device: str, batch_size: int, workspace: Path, collective: Collective) -> Callable[[list[list[dict]]], list[str]]:
    """A guard model's verdicts on (prompt, answer) conversations, through the one generation loop."""
    loaded = load_for_generation(folder, folder, device, torch.float32, None, workspace / "offload-guard")
    return lambda conversations: generate(loaded, conversations, GUARD_NEW_TOKENS, batch_size, description="guard verdicts", collective=collective)


def _classify(folder: Path, device: str, batch_size: int, harmful_label: str) -> Callable[[list[str], list[str]], list[str]]:
    from surgeon.io import hf_loading

    tokenizer = hf_loading.tokenizer(folder)
    model = hf_loading.sequence_classifier(folder).to(device).eval()
    labels = model.config.id2label
    # a batch is padded, and the model finds each row's last token by the pad id, which config.json
    # need not name (Llama 3's does not): the tokenizer's, else end-of-sequence
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if harmful_label not in labels.values():
        raise InputError(f"harmful_label '{harmful_label}' is not a label of the classifier (labels: {', '.join(map(str, labels.values()))})", str(folder))

    def run(prompts: list, answers: list[str]) -> list[str]:
        prompts = [prompt_text(p) for p in prompts]  # a conversation is classified by its last user turn
        names = []
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start : start + batch_size], answers[start : start + batch_size], return_tensors="pt",
                              padding=True, truncation=True).to(device)
            with torch.no_grad():
                names += [labels[int(i)] for i in model(**batch).logits.argmax(-1)]
        return names

    return run


def build_judge(spec: SafetyEvalSet, resolve: Callable[[str], str], device: str, batch_size: int, workspace: Path,
                collective: Collective = SOLO) -> Judge:
    if spec.judge == "refusal":
        return RefusalJudge(spec.markers, spec.add_markers)
    if spec.judge == "harmbench_prefixes":
        return HarmBenchPrefixJudge()
    model = resolve_model(resolve(spec.model.path), spec.model.allow_pickle)
    if spec.judge == "guard":
        return GuardJudge(_guard_generate(model.folder, device, batch_size, workspace, collective))
    return ClassifierJudge(_classify(model.folder, device, batch_size, spec.harmful_label), spec.harmful_label)


class Candidates:
    """Candidates of a run. Checkpoints are materialized (only when generation needs them) into
    the run's workspace, one at a time."""

    def __init__(self, base: ResolvedModel, tuned: ResolvedModel, tokenizer_folder: Path, workspace: Path):
        from surgeon.io.fingerprint import cache_root

        self.base_model, self.tuned_model = base, tuned
        self.tokenizer_folder, self.workspace = tokenizer_folder, Path(workspace)
        self._cache_root = cache_root()
        self._materialized: Path | None = None

    def _fingerprint(self, model: ResolvedModel) -> str:
        """The weights' content, and the tokenizer's: answers depend on the chat template too."""
        from surgeon.io.references import TOKENIZER_FILES

        tokenizer = [f"{name}:{file_sha256(self.tokenizer_folder / name)}" for name in TOKENIZER_FILES if (self.tokenizer_folder / name).is_file()]
        return combine(*(folder_fingerprint(folder, self._cache_root) for folder in model.content_folders), *tokenizer)

    def _materialize(self, get: Callable[[str], torch.Tensor], tag: str) -> Path:
        from surgeon.io.repaired import write_checkpoint

        folder = self.workspace / f"candidate-{tag[:16]}"
        if self._materialized == folder:
            return folder
        if self._materialized is not None:
            shutil.rmtree(self._materialized, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        write_checkpoint(folder, self.tuned_model, get, None, 5 * 10**9, self.tokenizer_folder)
        self._materialized = folder
        return folder

    def _input(self, name: str, plan: Plan, model: ResolvedModel) -> Candidate:
        """An input model. One merged from adapters, or whose weights lie in files from_pretrained
        would not read as surgeon does (safetensors under other names, which it passes over for a
        pickle beside them; pickles alone), is written out for generation from what surgeon reads."""
        fingerprint = lambda: self._fingerprint(model)
        standard = (model.folder / "model.safetensors").is_file() or (model.folder / "model.safetensors.index.json").is_file()
        if model.adapter_of is None and standard:
            return Candidate(name, plan, fingerprint, lambda: model.folder)
        return Candidate(name, plan, fingerprint, lambda: self._materialize(model.tensors.get, fingerprint()))

    def base(self) -> Candidate:
        return self._input("base", BASE, self.base_model)

    def tuned(self) -> Candidate:
        return self._input("tuned", TUNED, self.tuned_model)

    def repaired(self, masks: MaskSet, name: str = "repaired") -> Candidate:
        from surgeon.engine.masks import repaired_tensor

        fingerprint = lambda: combine(self._fingerprint(self.tuned_model), self._fingerprint(self.base_model), masks.digest())
        get = lambda n: repaired_tensor(n, self.base_model, self.tuned_model, masks)
        return Candidate(name, masks, fingerprint, lambda: self._materialize(get, fingerprint()))

    def for_plan(self, plan: Plan) -> Candidate:
        if plan == BASE:
            return self.base()
        return self.tuned() if plan == TUNED else self.repaired(plan, "checkpoint")

    def loader(self, device: str, dtype: torch.dtype, max_memory: int | None) -> Callable[[Path], LoadedModel]:
        def load(folder: Path) -> LoadedModel:
            has_tokenizer = (folder / "tokenizer_config.json").exists() or (folder / "tokenizer.json").exists()
            return load_for_generation(folder, folder if has_tokenizer else self.tokenizer_folder, device, dtype, max_memory, self.workspace / "offload")

        return load


class RunScorer:
    """The method's view of the evaluator: scores by plan."""

    def __init__(self, evaluator: Evaluator, candidates: Candidates):
        self.evaluator, self.candidates = evaluator, candidates
        metric = evaluator.metric
        self.name, self.higher_is_better, self.absolute_drop = metric.name, metric.higher_is_better, metric.absolute_drop

    def task(self, plan: Plan) -> float:
        candidate = self.candidates.for_plan(plan)
        score = self.evaluator.task_score(candidate)
        if not math.isfinite(score):
            raise NonFiniteError(f"the task {self.name} of {candidate.name} is {score}; try compute.dtype float32", "evaluate.task")
        return score

    def harm(self, plan: Plan) -> float | None:
        harm = self.evaluator.harm(self.candidates.for_plan(plan))
        return None if harm is None else harm[0]


def task_set(spec, prompts: list[str], references: list[str], streamed: Callable[[Plan], float] | None) -> TaskSet:
    metric = parse_metric(spec.metric)
    return TaskSet(prompts, references, metric, spec.max_new_tokens, streamed if not metric.generates else None)


def safety_set(spec: SafetyEvalSet, rows: HarmfulPrompts, judge: Judge) -> SafetySet:
    return SafetySet(rows, judge, spec.max_new_tokens)
