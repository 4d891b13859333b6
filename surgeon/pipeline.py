"""`surgeon run` and `surgeon validate` as functions: recipe in, repaired folder out."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from surgeon.errors import InputError, TaskFloorError
from surgeon.io.preflight import check_compatible
from surgeon.io.references import ResolvedModel, resolve_model, tokenizer_folder
from surgeon.progress import NullProgress, Progress
from surgeon.recipe import LoadedRecipe
from surgeon.recipe.schema import PromptSet, Recipe
from surgeon.recipe.sizes import parse_size


@dataclass
class RunOverrides:
    output: str | None = None
    overwrite: bool = False
    device: str | None = None


@dataclass
class Inputs:
    base: ResolvedModel
    tuned: ResolvedModel
    harmful: list[str]
    task: list[str]
    evaluation: tuple[list[str], list[str]] | None


def _prompts(loaded: LoadedRecipe, prompt_set: PromptSet, field_name: str) -> list[str]:
    from surgeon.data.datasets import column, load_rows

    if prompt_set.prompts is not None:
        return prompt_set.prompts[: prompt_set.limit] if prompt_set.limit else list(prompt_set.prompts)
    reference = loaded.resolve(prompt_set.path)
    try:
        return column(load_rows(reference), prompt_set.field, reference, prompt_set.limit)
    except InputError as exc:
        raise InputError(exc.message, f"{field_name}: {exc.where}") from None


def resolve_inputs(loaded: LoadedRecipe, progress: Progress = NullProgress()) -> Inputs:
    """Models, adapters and datasets of a recipe, checked against each other from headers only."""
    from surgeon.data.datasets import column, load_rows

    recipe = loaded.recipe
    progress.log("resolving models and data")
    base = resolve_model(loaded.resolve(recipe.base.path, may_be_hub_id=True), recipe.base.allow_pickle)
    tuned = resolve_model(loaded.resolve(recipe.tuned.path, may_be_hub_id=True), recipe.tuned.allow_pickle, base=base)
    check_compatible(base, tuned)
    evaluation = None
    if recipe.evaluate.task is not None:
        spec = recipe.evaluate.task
        reference = loaded.resolve(spec.path)
        rows = load_rows(reference)
        evaluation = (column(rows, spec.prompt_field, reference, spec.limit), column(rows, spec.answer_field, reference, spec.limit))
    return Inputs(base, tuned, _prompts(loaded, recipe.data.harmful, "data.harmful"), _prompts(loaded, recipe.data.task, "data.task"), evaluation)


def _device(setting: str) -> str:
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device '{setting}' asked for but no CUDA GPU is visible", "compute.device")
    return setting


def _memory_budget(setting, device: str) -> int:
    """Bytes of activations and gradients kept in memory before spilling to disk."""
    if setting is not None:
        return parse_size(setting)
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return free // 2
    import psutil

    return psutil.virtual_memory().available // 2


def validate(loaded: LoadedRecipe, progress: Progress = NullProgress()) -> dict:
    """Schema (already checked by loading), references, datasets and the preflight; no heavy work."""
    from transformers import AutoConfig

    from surgeon.engine.layout import ModelLayout, build_skeleton

    inputs = resolve_inputs(loaded, progress)
    tensors = inputs.tuned.tensors
    config = AutoConfig.from_pretrained(inputs.tuned.config_folder)
    layout = ModelLayout.from_checkpoint(tensors.names(), {n: tensors.shape(n) for n in tensors.names()}, build_skeleton(config))
    recipe = loaded.recipe
    probe_layer = layout.probe_layer(recipe.probe.layer)
    return {
        "layers": layout.num_layers,
        "probe_layer": probe_layer,
        "decoder_parameters": layout.decoder_parameters,
        "budget_per_step": layout.budget(recipe.restore.sparsity),
        "in_scope_parameters": sum(_numel(tensors.shape(n)) for layer in layout.scope(probe_layer) for n in layer),
        "harmful_prompts": len(inputs.harmful),
        "task_prompts": len(inputs.task),
        "evaluation_rows": len(inputs.evaluation[0]) if inputs.evaluation else 0,
    }


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def run(loaded: LoadedRecipe, overrides: RunOverrides = RunOverrides(), progress: Progress = NullProgress()) -> dict:
    """Repair, write atomically, return the report (also saved as surgeon.json)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from surgeon.data.batches import answer_batches, prompt_batches
    from surgeon.engine.allocator import return_large_frees_to_os
    from surgeon.engine.layered import BASE, TUNED, LayeredModel
    from surgeon.engine.masks import MaskSet
    from surgeon.engine.store import SpillStore
    from surgeon.evaluate.task_loss import TaskLoss
    from surgeon.io.atomic import AtomicOutputDir
    from surgeon.io.repaired import DTYPES, write_repaired
    from surgeon.methods.restore import RestoreMethod, RestoreSettings
    from surgeon.report import PhaseTimer, build_report, write_report

    recipe: Recipe = loaded.recipe
    return_large_frees_to_os()
    timer = PhaseTimer()
    torch.manual_seed(recipe.seed)
    destination = Path(overrides.output) if overrides.output else Path(loaded.resolve(recipe.output.path))
    with timer.phase("resolve"):
        inputs = resolve_inputs(loaded, progress)
    device = _device(overrides.device or recipe.compute.device)
    protected = [inputs.base.folder, inputs.tuned.folder]
    with AtomicOutputDir(destination, overrides.overwrite, protected) as output:
        with timer.phase("prepare"):
            config = AutoConfig.from_pretrained(inputs.tuned.config_folder)
            tokenizer_files = tokenizer_folder(inputs.tuned, inputs.base)
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_files)
            # one budget, split between boundary activations and accumulated gradients
            budget = _memory_budget(recipe.compute.max_memory, device)
            store = SpillStore(budget // 2, output.workspace / "activations")
            engine = LayeredModel(config, inputs.base.tensors, inputs.tuned.tensors, store, device, DTYPES[recipe.compute.dtype], progress)
            layout = engine.layout
            probe_layer = layout.probe_layer(recipe.probe.layer)
            batch = recipe.probe.batch_size
            harmful = prompt_batches(tokenizer, inputs.harmful, batch, recipe.probe.system_prompt)
            task = prompt_batches(tokenizer, inputs.task, batch, recipe.probe.system_prompt)
            score = None
            if inputs.evaluation is not None:
                prompts, answers = inputs.evaluation
                score = TaskLoss(engine, answer_batches(tokenizer, prompts, answers, recipe.evaluate.batch_size, recipe.probe.system_prompt))
            settings = RestoreSettings(
                probe_layer=probe_layer, budget=layout.budget(recipe.restore.sparsity), steps=recipe.restore.steps,
                warmup=recipe.restore.warmup, save_every=recipe.restore.save_every, rollback_mode=recipe.rollback.mode,
                rollback_ratio=recipe.rollback.ratio, max_task_drop=recipe.rollback.max_task_drop,
            )
            method = RestoreMethod(
                engine, layout.scope(probe_layer), engine.prepare(harmful, BASE, probe_layer), engine.prepare(harmful, TUNED, probe_layer),
                engine.prepare(task, TUNED, probe_layer), settings, output.workspace / "checkpoints",
                SpillStore(budget - budget // 2, output.workspace / "gradients"), score, progress,
            )
        with timer.phase("repair"):
            result = method.run()
        chosen = result.chosen
        if chosen is None:
            scores = ", ".join(f"step {c.step}: {c.score:.4f}" for c in result.checkpoints)
            if not recipe.output.write_below_floor:
                raise TaskFloorError(
                    f"every checkpoint fell past the task floor {result.floor:.4f} (tuned {result.tuned_score:.4f}; {scores}); "
                    "nothing written. Lower restore.sparsity or steps, raise rollback.max_task_drop, or set output.write_below_floor",
                    "evaluate.task",
                )
            best = min if not score.higher_is_better else max
            chosen = best(result.checkpoints, key=lambda c: c.score)
            progress.log(f"no checkpoint met the floor; writing step {chosen.step}, the best task score, as asked")
        masks = MaskSet.load(chosen.path)
        with timer.phase("write"):
            shards = write_repaired(output.temporary, inputs.base, inputs.tuned, masks, recipe.output.dtype, parse_size(recipe.output.max_shard_size), tokenizer_files, progress)
            masks.save(output.temporary / "masks.safetensors", {"step": str(chosen.step)})
            (output.temporary / "recipe.yaml").write_text(loaded.text)
        report = build_report(
            recipe_sha256=loaded.sha256,
            inputs={"base": inputs.base.describe(), "tuned": inputs.tuned.describe()},
            settings={**asdict(settings), "layers_L": layout.num_layers, "device": device, "compute_dtype": recipe.compute.dtype,
                      "harmful_prompts": len(inputs.harmful), "task_prompts": len(inputs.task)},
            result=result, masks=masks, decoder_parameters=layout.decoder_parameters, timer=timer,
            extra={"output": {"shards": shards, "path": str(output.destination)},
                   "memory": {"max_decoder_layers_materialized": engine.max_materialized_layers,
                              "budget_bytes": budget, "activations_peak_bytes": store.peak_bytes,
                              "spilled_bytes": store.spilled_bytes + method.accumulated.spilled_bytes}},
        )
        write_report(output.temporary / "surgeon.json", report)
        output.commit()
    return report
