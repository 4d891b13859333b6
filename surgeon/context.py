"""What methods, the final evaluation and `surgeon eval` are built from, built one way.

`ModelPair`: an engine, evaluation candidates and evaluators over a (base side, tuned side) pair.
`RunContext`: one `surgeon run`: the recipe, its resolved inputs, the device, the memory budget,
the workspace and saved state, the pair (base, tuned) and the evaluators that choose and report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from surgeon.allocator import fit_to_budget, release_free_memory
from surgeon.errors import InputError
from surgeon.io.references import ResolvedModel
from surgeon.processes import SOLO, Collective
from surgeon.progress import NullProgress, Progress
from surgeon.recipe.schema import Evaluate, Recipe

if TYPE_CHECKING:
    from surgeon.io.run_state import RunState
    from surgeon.pipeline import Inputs


def resolve_device(setting: str) -> str:
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device '{setting}' asked for but no CUDA GPU is visible", "compute.device")
    if setting.startswith("cuda:") and int(setting.split(":")[1]) >= torch.cuda.device_count():
        raise InputError(f"device '{setting}' asked for but this machine has {torch.cuda.device_count()} CUDA GPU(s)", "compute.device")
    if setting == "mps" and not torch.backends.mps.is_available():
        raise InputError("device 'mps' asked for but this torch has no Apple GPU (torch.backends.mps.is_available() is false)", "compute.device")
    return setting


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DEFAULT_BUDGET_MODELS = 2  # the default budget, in model sizes (compute dtype)
DEFAULT_BUDGET_FLOOR = 2**30


def memory_budget(setting: int | None, device: str, model_bytes: int | None = None) -> int:
    """compute.max_memory: the memory on the compute device that surgeon's working data may take.
    Boundary activations and accumulated gradients share it (half each) and spill to disk past
    it; a model loaded for generation keeps its layers within it and offloads the rest. Unset:
    twice the model's size in the compute dtype (at least 1 GiB), or half the free memory where
    that is less, and generation models load whole. Sized to the model, not the machine: half of
    a large machine's memory filled with autograd graphs (a step about a quarter faster) made the
    quick start's footprint depend on where it ran; a larger compute.max_memory buys them back.
    Without a model (`surgeon eval` with no recipe), half the free memory."""
    if setting is not None:
        return setting
    from accelerate.utils import get_max_memory

    free = get_max_memory()  # accelerate's probe: free memory per GPU index, and "cpu"
    key = int(device.split(":")[1]) if device.startswith("cuda:") else 0 if device.startswith("cuda") else device
    half = free.get(key, free["cpu"]) // 2
    return half if model_bytes is None else min(half, max(DEFAULT_BUDGET_FLOOR, DEFAULT_BUDGET_MODELS * model_bytes))


def model_bytes(model: ResolvedModel, dtype: str) -> int:
    """The model's size in the compute dtype, from its checkpoint's headers."""
    tensors = model.tensors
    return sum(math.prod(tensors.shape(name)) for name in tensors.names()) * DTYPE_BYTES[dtype]


@dataclass
class ModelSettings:
    """How models are run, the same for every pair of a command."""

    device: str
    dtype: str
    budget: int
    generation_budget: int | None  # None: generation models load whole
    system_prompt: str | None
    resolve: Callable[[str], str]  # a recipe reference (a judge model) to a loadable one
    progress: Progress = NullProgress()
    collective: Collective = SOLO  # the processes of a data-parallel run (processes.start)

    @classmethod
    def of(cls, compute, system_prompt: str | None, resolve: Callable[[str], str], device: str, progress: Progress,
           collective: Collective = SOLO, model: ResolvedModel | None = None) -> "ModelSettings":
        """`model`: the one the default budget is sized to (tuned)."""
        size = None if model is None else model_bytes(model, compute.dtype)
        return cls(device, compute.dtype, memory_budget(compute.max_memory, device, size),
                   compute.max_memory, system_prompt, resolve, progress, collective)

    @property
    def activations_bytes(self) -> int:
        """The share of the budget for boundary activations and the autograd graphs kept beside them."""
        return self.budget // 2

    @property
    def stores_bytes(self) -> int:
        """The share for a method's own stores (restore's accumulated gradients, the tensors a
        value-writing method leaves for the writer)."""
        return self.budget - self.activations_bytes

    @property
    def bounded(self) -> bool:
        """`compute.max_memory` was set: the budget is the user's limit, not a share of what is free."""
        return self.generation_budget is not None


class ModelPair:
    """The engine, candidates and evaluators over base (the values a mask restores) and tuned.
    `surgeon eval` puts one model on both sides."""

    def __init__(self, base: ResolvedModel, tuned: ResolvedModel, tokenizer_files: Path, settings: ModelSettings, workspace: Path):
        self.base, self.tuned, self.tokenizer_files, self.settings, self.workspace = base, tuned, tokenizer_files, settings, Path(workspace)
        fit_to_budget(settings.budget, bounded=settings.bounded)

    @cached_property
    def config(self):
        from surgeon.io import hf_loading

        return hf_loading.config(self.tuned.config_folder)

    @cached_property
    def tokenizer(self):
        from surgeon.io import hf_loading

        return hf_loading.tokenizer(self.tokenizer_files, self.config)

    @property
    def torch_dtype(self):
        from surgeon.io.repaired import DTYPES

        return DTYPES[self.settings.dtype]

    @cached_property
    def activations(self):
        from surgeon.engine.store import SpillStore

        return SpillStore(self.settings.activations_bytes, self.workspace / "activations")

    @cached_property
    def engine(self):
        from surgeon.engine.layered import LayeredModel

        s = self.settings
        return LayeredModel(self.config, self.base.tensors, self.tuned.tensors, self.activations, s.device, self.torch_dtype, s.progress,
                            s.collective)

    @property
    def layout(self):
        return self.engine.layout  # the engine is a skeleton on meta until a pass runs: cheap to build

    @cached_property
    def candidates(self):
        from surgeon.evaluation.setup import Candidates

        return Candidates(self.base, self.tuned, self.tokenizer_files, self.workspace / "candidates")

    def evaluator(self, spec: Evaluate, safety_prompts, task_rows: tuple[list[str], list[str]] | None, benign_prompts: list | None = None,
                  divergence: bool = False, stop_early: bool = True):
        """The evaluator of an `evaluate` section, or None when it names nothing to score. The
        streamed metrics (loss, kl) run through this pair's engine; `benign_prompts` (the final
        table's alone) give each model's over-refusal and, with `divergence` (this pair's tuned is
        the run's tuned), its KL divergence from tuned on them. `stop_early`: Evaluator's."""
        from surgeon.data.batches import answer_batches, prompt_batches
        from surgeon.evaluation.evaluator import BenignSet, Evaluator
        from surgeon.evaluation.judges import RefusalJudge
        from surgeon.evaluation.setup import build_judge, safety_set, task_set
        from surgeon.evaluation.streamed import TaskDivergence, TaskLoss

        if spec.safety is None and spec.task is None and not benign_prompts:
            return None
        s = self.settings
        safety = task = None
        if spec.safety is not None:
            safety = safety_set(spec.safety, safety_prompts, build_judge(spec.safety, s.resolve, s.device, spec.batch_size, self.workspace, s.collective))
        if spec.task is not None:
            prompts, references = task_rows
            streamed = None
            if spec.task.metric == "loss":
                streamed = TaskLoss(self.engine, answer_batches(self.tokenizer, prompts, references, spec.batch_size, s.system_prompt, spec.task.balance))
            elif spec.task.metric == "kl":
                streamed = TaskDivergence(self.engine, prompt_batches(self.tokenizer, prompts, spec.batch_size, s.system_prompt))
            task = task_set(spec.task, prompts, references, streamed)
        benign = None
        if benign_prompts:  # refusals read with the safety judge's markers where it has its own
            own = spec.safety if spec.safety is not None and spec.safety.judge == "refusal" else None
            refusals = RefusalJudge(own.markers, own.add_markers) if own else RefusalJudge()
            kl = TaskDivergence(self.engine, prompt_batches(self.tokenizer, benign_prompts, spec.batch_size, s.system_prompt)) if divergence else None
            benign = BenignSet(benign_prompts, spec.benign.max_new_tokens, refusals.refuses, kl, refusals.refusal_settled)
        load = self.candidates.loader(s.device, self.torch_dtype, s.generation_budget)
        return Evaluator(safety, task, load, spec.batch_size, s.system_prompt, progress=s.progress, benign=benign, stop_early=stop_early,
                         collective=s.collective)


@dataclass
class RunContext:
    """One `surgeon run`, as a method sees it."""

    recipe: Recipe  # validated, with any registered method's section
    inputs: Inputs
    pair: ModelPair
    workspace: Path  # the run's hidden work folder beside the destination, removed with it
    state: RunState  # what a killed run resumes from
    progress: Progress
    stores: list = field(default_factory=list)  # the method's spill stores, for the memory record

    def spill_store(self, name: str):
        """A store for the method's own tensors (restore: accumulated gradients), in the half of
        compute.max_memory that activations leave, spilling past it into the workspace."""
        from surgeon.engine.store import SpillStore

        store = SpillStore(self.settings.stores_bytes, self.workspace / name)
        self.stores.append(store)
        return store

    @property
    def settings(self) -> ModelSettings:
        return self.pair.settings

    @cached_property
    def evaluator(self):
        """The evaluator of the final table: evaluate's own rows."""
        return self.pair.evaluator(self.recipe.evaluate, self.inputs.safety, self.inputs.evaluation, self.inputs.benign, divergence=True)

    @cached_property
    def chooser(self):
        """The evaluator that scores checkpoints: select_on's rows where given, else the reporting one."""
        if self.recipe.evaluate.select_on is None:
            return self.evaluator
        return self.pair.evaluator(self.recipe.evaluate.choosing(), self.inputs.choosing_safety, self.inputs.choosing_evaluation)

    @cached_property
    def scorer(self):
        """Scores by plan, for methods that choose among checkpoints; None without a task set."""
        from surgeon.evaluation.setup import RunScorer

        chooser = self.chooser
        return RunScorer(chooser, self.pair.candidates) if chooser is not None and chooser.task is not None else None

    @property
    def chose(self) -> bool:
        """Whether the method scored checkpoints to choose among them."""
        return self.__dict__.get("scorer") is not None

    def method_done(self) -> None:
        """What only the method needed goes before the write: its stores (restore's accumulated
        gradients, up to half of compute.max_memory) and the choosing evaluator's generation
        model (the final table loads its own)."""
        for store in self.stores:
            store.clear()
        if "chooser" in self.__dict__ and self.chooser is not None and self.chooser is not self.evaluator:
            self.chooser.release()
        release_free_memory(force=True)

    def prompt_batches(self, prompts: list[str]):
        from surgeon.data.batches import prompt_batches

        return prompt_batches(self.pair.tokenizer, prompts, self.recipe.probe.batch_size, self.recipe.probe.system_prompt)

    def answer_batches(self, prompts: list[str], answers: list[str]):
        """Batches of data.task's prompts and answers, weighted as data.task.balance says."""
        from surgeon.data.batches import answer_batches

        return answer_batches(self.pair.tokenizer, prompts, answers, self.recipe.probe.batch_size, self.recipe.probe.system_prompt,
                              self.recipe.data.task.balance)

    @property
    def probe_layer(self) -> int:
        return self.pair.layout.probe_layer(self.recipe.probe.layer)

    def share_of_decoder(self, names) -> dict:
        """`changed` of a Repair that replaces whole tensors."""
        shapes = self.pair.tuned.tensors
        layout = self.pair.layout
        decoder = {n for layer in layout.layer_tensors for n in layer}
        numel = lambda name: math.prod(shapes.shape(name))
        names = sorted(names)
        return {"tensors": len(names), "parameters": sum(numel(n) for n in names),
                "share_of_N": sum(numel(n) for n in names if n in decoder) / layout.decoder_parameters}
