"""`surgeon plan`: what a run will need, before it starts, from the checkpoint's headers and the
prompts' token counts. The part every method shares (imports, the model loaded to generate, the
output and the checkpoint written to judge it) is here; a method that registers an estimate
(`MethodSpec.plan`: restore's is methods/restore/plan.py) adds its own memory, disk, facts and time."""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from surgeon.context import DTYPE_BYTES
from surgeon.errors import OutputError
from surgeon.progress import NullProgress, Progress

IMPORTS_BYTES = 360 * 2**20  # torch, transformers and surgeon loaded, measured on the demo (0.34-0.36 GiB)


@dataclass
class Estimate:
    """A method's own needs: peak memory and disk by part, the facts they rest on, and what
    `surgeon plan` prints of them."""

    memory: dict[str, int] = field(default_factory=dict)
    disk: dict[str, int] = field(default_factory=dict)
    facts: dict = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    time: Callable[[], tuple[float, list[str]]] | None = None  # a step's seconds and what to print, measured (calibration)
    # the parts of `memory` held only while the method's own passes run, never beside a model loaded to generate
    pass_only: tuple[str, ...] = ()
    judges_checkpoints: bool = False  # the method generates to score its checkpoints where the choosing sets ask it


@dataclass
class ResourcePlan:
    method: str
    memory: dict[str, int]  # the parts of the peak, each at its largest
    disk: dict[str, int]
    memory_budget_bytes: int  # compute.max_memory's one meaning
    free_disk_bytes: int
    facts: dict
    lines: list[str]
    seconds_per_step: float | None = None
    pass_only: tuple[str, ...] = ()

    @property
    def peak_memory_bytes(self) -> int:
        """The larger of the two phases: the method's passes (everything but the generation model)
        and generation (everything but what the passes alone hold)."""
        passes = sum(size for name, size in self.memory.items() if name != "generation_model")
        generating = sum(size for name, size in self.memory.items() if name not in self.pass_only)
        return max(passes, generating)

    @property
    def disk_bytes(self) -> int:
        return sum(self.disk.values())


def _free_disk(folder: Path) -> int:
    """Free bytes where `folder` is or would be created (its nearest existing parent)."""
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def _generates(evaluate, judges_checkpoints: bool) -> bool:
    """Whether a run loads a model to generate: for the final table (a model in it, and harmful,
    harmless or generated task rows), or to score checkpoints (a method that does, with a task set
    to choose on and harmful or generated task rows)."""
    generated_task = lambda e: e.task is not None and e.task.metric not in ("loss", "kl")
    final = bool(evaluate.models) and (evaluate.safety is not None or evaluate.benign is not None or generated_task(evaluate))
    choosing = evaluate.choosing()
    return final or (judges_checkpoints and choosing.task is not None and (choosing.safety is not None or generated_task(choosing)))


def plan(loaded, destination: Path, progress: Progress = NullProgress(), calibrate: bool = True) -> ResourcePlan:
    """The memory, disk (and, where the method estimates it, time) a run of `loaded` needs;
    refuses when the destination's disk cannot hold it."""
    from surgeon.context import ModelPair, ModelSettings, model_bytes, resolve_device
    from surgeon.io.references import tokenizer_folder
    from surgeon.methods.registry import method_spec
    from surgeon.pipeline import resolve_inputs

    recipe = loaded.recipe
    spec = method_spec(recipe.method)
    inputs = resolve_inputs(loaded, progress)
    settings = ModelSettings.of(recipe.compute, recipe.probe.system_prompt, lambda ref: loaded.resolve(ref, True),
                                resolve_device(recipe.compute.device), progress, model=inputs.tuned)
    scratch = destination.parent / f".{destination.name}.surgeon-plan"
    try:
        pair = ModelPair(inputs.base, inputs.tuned, tokenizer_folder(inputs.tuned, inputs.base), settings, scratch)
        own = spec.estimate(recipe, inputs, pair) if spec.plan else Estimate(
            lines=[f"method {spec.name} declares no estimate of its own: the figures are the output's and the evaluation's"])
        tensors = inputs.tuned.tensors
        generates = _generates(recipe.evaluate, own.judges_checkpoints)
        generation = 0
        if generates:
            whole = model_bytes(inputs.tuned, recipe.compute.dtype)
            resident = min(whole, settings.generation_budget) if settings.generation_budget else whole
            generation = 2 * resident  # while loading, the checkpoint's mapped pages count too
        out_bytes = DTYPE_BYTES.get(recipe.output.dtype or "", 0)
        output = sum(math.prod(tensors.shape(n)) * (out_bytes or tensors.dtype(n).itemsize) for n in tensors.names())
        stored = sum(math.prod(tensors.shape(n)) * tensors.dtype(n).itemsize for n in tensors.names())
        disk = {"output": output, **own.disk, "evaluation_checkpoint": stored if generates else 0}  # a checkpoint written for from_pretrained
        result = ResourcePlan(spec.name, {"imports": IMPORTS_BYTES, **own.memory, "generation_model": generation}, disk, settings.budget,
                              _free_disk(destination.parent), own.facts, own.lines, pass_only=own.pass_only)
        if result.disk_bytes > result.free_disk_bytes:
            parts = ", ".join(f"{name.replace('_', ' ')} {size / 1e9:.1f}" for name, size in disk.items())
            raise OutputError(f"the run needs {result.disk_bytes / 1e9:.1f} GB of disk beside the destination ({parts}) and "
                              f"{result.free_disk_bytes / 1e9:.1f} GB are free", str(destination.parent))
        if calibrate and own.time is not None:
            result.seconds_per_step, timed = own.time()
            result.lines += timed
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return result
