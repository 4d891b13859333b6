"""`surgeon run` and `surgeon validate` as functions: recipe in, repaired folder out."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from surgeon.errors import InputError, TaskFloorError
from surgeon.io.preflight import check_compatible
from surgeon.io.references import ResolvedModel, local_name, resolve_model, tokenizer_folder
from surgeon.progress import NullProgress, Progress
from surgeon.recipe import LoadedRecipe
from surgeon.recipe.schema import Evaluate, PromptSet, Recipe, SafetyEvalSet, TaskEvalSet
from surgeon.recipe.sizes import parse_size


@dataclass
class RunOverrides:
    output: str | None = None
    overwrite: bool = False
    device: str | None = None
    force_push: bool = False
    fresh: bool = False  # discard the saved state of an interrupted run


@dataclass
class Inputs:
    base: ResolvedModel
    tuned: ResolvedModel
    harmful: list[str]
    task: list[str]
    evaluation: tuple[list[str], list[str]] | None
    safety: list[str] | None = None
    unaligned: ResolvedModel | None = None
    choosing_evaluation: tuple[list[str], list[str]] | None = None  # evaluate.choosing()'s rows
    choosing_safety: list[str] | None = None


def _prompts(loaded: LoadedRecipe, prompt_set: PromptSet | SafetyEvalSet, field_name: str) -> list[str]:
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
    recipe = loaded.recipe
    progress.log("resolving models and data")
    base = resolve_model(loaded.resolve(recipe.base.path, may_be_hub_id=True), recipe.base.allow_pickle)
    tuned = resolve_model(loaded.resolve(recipe.tuned.path, may_be_hub_id=True), recipe.tuned.allow_pickle, base=base)
    check_compatible(base, tuned)
    unaligned = None
    if recipe.unaligned is not None:
        unaligned = resolve_model(loaded.resolve(recipe.unaligned.path, may_be_hub_id=True), recipe.unaligned.allow_pickle, base=base)
        check_compatible(base, unaligned)
    evaluation = _task_rows(loaded, recipe.evaluate.task)
    safety = _prompts(loaded, recipe.evaluate.safety, "evaluate.safety") if recipe.evaluate.safety else None
    harmful = _prompts(loaded, recipe.data.harmful, "data.harmful") if recipe.data else []
    task = _prompts(loaded, recipe.data.task, "data.task") if recipe.data else []
    choosing = recipe.evaluate.select_on
    return Inputs(
        base, tuned, harmful, task, evaluation, safety, unaligned,
        choosing_evaluation=_task_rows(loaded, choosing.task) if choosing and choosing.task else evaluation,
        choosing_safety=_prompts(loaded, choosing.safety, "evaluate.select_on.safety") if choosing and choosing.safety else safety,
    )


def _task_rows(loaded: LoadedRecipe, spec: TaskEvalSet | None) -> tuple[list[str], list[str]] | None:
    from surgeon.data.datasets import column, load_rows

    if spec is None:
        return None
    reference = loaded.resolve(spec.path)
    rows = load_rows(reference)
    return column(rows, spec.prompt_field, reference, spec.limit), column(rows, spec.answer_field, reference, spec.limit)


def destination(loaded: LoadedRecipe, overrides: RunOverrides) -> Path:
    """Where a run writes: --output (from the current folder), else output.path (from the recipe's)."""
    return Path(overrides.output or loaded.resolve(loaded.recipe.output.path)).expanduser().resolve()


def _local_data(loaded: LoadedRecipe) -> dict[str, Path]:
    """The recipe fields that name local data files (or a local judge model), with their paths."""
    recipe = loaded.recipe
    references = {}
    if recipe.data is not None:
        references.update({"data.harmful": recipe.data.harmful.path, "data.task": recipe.data.task.path})
    if recipe.evaluate.task is not None:
        references["evaluate.task"] = recipe.evaluate.task.path
    if recipe.evaluate.safety is not None:
        references["evaluate.safety"] = recipe.evaluate.safety.path
        if recipe.evaluate.safety.model is not None:
            references["evaluate.safety.model"] = recipe.evaluate.safety.model.path
    if recipe.evaluate.select_on is not None:
        for name, rows in (("task", recipe.evaluate.select_on.task), ("safety", recipe.evaluate.select_on.safety)):
            if rows is not None:
                references[f"evaluate.select_on.{name}"] = rows.path
    paths = {field: Path(loaded.resolve(ref)) for field, ref in references.items() if ref and "://" not in ref}
    return {field: path for field, path in paths.items() if path.exists()}


def _input_paths(loaded: LoadedRecipe, inputs: Inputs) -> list[Path]:
    """Everything a run reads, which its output may never replace, contain or sit inside."""
    models = [m for m in (inputs.base, inputs.tuned, inputs.unaligned) if m is not None]
    return [loaded.path, *_local_data(loaded).values(), *(f for m in models for f in (m.folder, *m.content_folders))]


def _describe_inputs(loaded: LoadedRecipe, inputs: Inputs, progress: Progress) -> dict:
    """surgeon.json's `inputs`, by recipe field: Hub inputs by id@commit, local ones by name and
    content hash (the records are published with the model; local paths are private)."""
    from surgeon.io.fingerprint import file_sha256, folder_fingerprint

    models = {role: m for role, m in (("base", inputs.base), ("tuned", inputs.tuned), ("unaligned", inputs.unaligned)) if m is not None}
    with progress.task("fingerprinting local inputs", total=None):
        described = {role: model.describe() for role, model in models.items()}
        for field, path in _local_data(loaded).items():
            digest = "sha256:" + (file_sha256(path) if path.is_file() else folder_fingerprint(path))
            described[field] = {"reference": local_name(path), "local": {local_name(path): digest}}
    return described


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


def build_evaluator(spec: Evaluate, system_prompt: str | None, safety_prompts: list[str] | None, task_rows, engine, tokenizer,
                    load, resolve, device: str, progress: Progress):
    """The evaluator of an `evaluate` section, or None when it names nothing to score.
    `engine` serves the streamed metrics (loss, kl); plan TUNED is the model they score by default."""
    from surgeon.data.batches import answer_batches, prompt_batches
    from surgeon.evaluate.evaluator import Evaluator
    from surgeon.evaluate.setup import build_judge, safety_set, task_set
    from surgeon.evaluate.streamed import TaskDivergence, TaskLoss

    if spec.safety is None and spec.task is None:
        return None
    safety = task = None
    if spec.safety is not None:
        safety = safety_set(spec.safety, safety_prompts, build_judge(spec.safety, resolve, device, spec.batch_size))
    if spec.task is not None:
        prompts, references = task_rows
        streamed = None
        if spec.task.metric == "loss":
            streamed = TaskLoss(engine, answer_batches(tokenizer, prompts, references, spec.batch_size, system_prompt))
        elif spec.task.metric == "kl":
            streamed = TaskDivergence(engine, prompt_batches(tokenizer, prompts, spec.batch_size, system_prompt))
        task = task_set(spec.task, prompts, references, streamed)
    return Evaluator(safety, task, load, spec.batch_size, system_prompt, progress=progress)


def _generation_budget(recipe: Recipe) -> int | None:
    return parse_size(recipe.compute.max_memory) if recipe.compute.max_memory else None


def run(loaded: LoadedRecipe, overrides: RunOverrides = RunOverrides(), progress: Progress = NullProgress()) -> dict:
    """Repair, write atomically, evaluate, return the report (also saved as surgeon.json and report.md)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from surgeon.data.batches import prompt_batches
    from surgeon.engine.layered import BASE, TUNED, LayeredModel
    from surgeon.engine.masks import MaskSet
    from surgeon.engine.store import SpillStore
    from surgeon.evaluate.evaluator import Candidate
    from surgeon.evaluate.setup import Candidates, RunScorer
    from surgeon.io.atomic import AtomicOutputDir
    from surgeon.io.repaired import DTYPES, write_repaired
    from surgeon.io.run_state import RunState, state_folder
    from surgeon.methods.restore import RestoreMethod, RestoreSettings
    from surgeon.report import PhaseTimer, build_report, tool_identity

    recipe: Recipe = loaded.recipe
    if recipe.method != "restore":
        return _run_baseline(loaded, overrides, progress)
    timer = PhaseTimer()
    torch.manual_seed(recipe.seed)
    with timer.phase("resolve"):
        inputs = resolve_inputs(loaded, progress)
    device = _device(overrides.device or recipe.compute.device)
    with AtomicOutputDir(destination(loaded, overrides), overrides.overwrite, _input_paths(loaded, inputs)) as output:
        with timer.phase("resolve"):  # after the destination check: hashing a large local model takes minutes
            described = _describe_inputs(loaded, inputs, progress)
        # what a saved state must match to be resumed: this recipe, these inputs' contents, this device and surgeon
        key = {"recipe_sha256": loaded.sha256, "inputs": {field: d.get("revision") or d.get("local") for field, d in described.items()},
               "device": device, "surgeon": tool_identity()}
        state = RunState.open(state_folder(output.destination), key, overrides.fresh, progress)
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
            candidates = Candidates(inputs.base, inputs.tuned, tokenizer_files, output.workspace / "candidates")
            def evaluator_for(spec, safety, rows):
                return build_evaluator(spec, recipe.probe.system_prompt, safety, rows, engine, tokenizer,
                                       candidates.loader(device, DTYPES[recipe.compute.dtype], _generation_budget(recipe)),
                                       lambda ref: loaded.resolve(ref, may_be_hub_id=True), device, progress)

            # the rows that report, and the rows that choose: the same evaluator unless select_on gives others
            evaluator = evaluator_for(recipe.evaluate, inputs.safety, inputs.evaluation)
            chooser = evaluator if recipe.evaluate.select_on is None else evaluator_for(
                recipe.evaluate.choosing(), inputs.choosing_safety, inputs.choosing_evaluation)
            scorer = RunScorer(chooser, candidates) if chooser is not None and chooser.task is not None else None
            batch = recipe.probe.batch_size
            harmful = prompt_batches(tokenizer, inputs.harmful, batch, recipe.probe.system_prompt)
            task = prompt_batches(tokenizer, inputs.task, batch, recipe.probe.system_prompt)
            settings = RestoreSettings(
                probe_layer=probe_layer, budget=layout.budget(recipe.restore.sparsity), steps=recipe.restore.steps,
                warmup=recipe.restore.warmup, save_every=recipe.restore.save_every, rollback_mode=recipe.rollback.mode,
                rollback_ratio=recipe.rollback.ratio, max_task_drop=recipe.rollback.max_task_drop, select=recipe.evaluate.selection,
                stop_at_harmful_rate=recipe.restore.stop_at.harmful_rate if recipe.restore.stop_at else None,
            )
            method = RestoreMethod(
                engine, layout.scope(probe_layer), engine.prepare(harmful, BASE, probe_layer), engine.prepare(harmful, TUNED, probe_layer),
                engine.prepare(task, TUNED, probe_layer), settings, state.checkpoints,
                SpillStore(budget - budget // 2, output.workspace / "gradients"), scorer, progress, state,
            )
        with timer.phase("repair"):
            result = method.run()
        if chooser is not evaluator:
            chooser.release()  # its generation model; the final table loads its own
        chosen = result.chosen
        if chosen is None:
            scores = ", ".join(f"step {c.step}: {c.score:.4f}" for c in result.checkpoints)
            if not recipe.output.write_below_floor:
                raise TaskFloorError(
                    f"every checkpoint fell past the task floor {result.floor:.4f} (tuned {result.tuned_score:.4f}; {scores}); "
                    "nothing written. Lower restore.sparsity or steps, raise rollback.max_task_drop, or set output.write_below_floor",
                    "evaluate.task",
                )
            chosen = (max if scorer.higher_is_better else min)(result.checkpoints, key=lambda c: c.score)
            progress.log(f"no checkpoint met the floor; writing step {chosen.step}, the best task score, as asked")
        masks = MaskSet.load(chosen.path)
        with timer.phase("write"):
            shards = write_repaired(output.temporary, inputs.base, inputs.tuned, masks, recipe.output.dtype, parse_size(recipe.output.max_shard_size), tokenizer_files, progress)
            masks.save(output.temporary / "masks.safetensors", {"step": str(chosen.step)})
        evaluation = None
        if evaluator is not None:
            with timer.phase("evaluate"):
                checkpoint = candidates.repaired(masks)
                # the written output is the repaired model; no need to materialize it again
                repaired = Candidate("repaired", masks, checkpoint.fingerprint, lambda: output.temporary)
                chosen_models = {"base": candidates.base, "tuned": candidates.tuned, "repaired": lambda: repaired}
                models = {name: evaluator.evaluate(chosen_models[name]()).to_dict() for name in recipe.evaluate.models}
                models.get("repaired", {})["restored"] = masks.count()
                evaluation = _evaluation_summary(recipe, inputs, [evaluator, chooser] if chooser is not evaluator else [evaluator], models,
                                                 chose_checkpoint=scorer is not None)
        report = build_report(
            recipe_sha256=loaded.sha256,
            inputs=described,
            settings={**asdict(settings), "layers_L": layout.num_layers, "device": device, "compute_dtype": recipe.compute.dtype,
                      "harmful_prompts": len(inputs.harmful), "task_prompts": len(inputs.task)},
            result=result, masks=masks, decoder_parameters=layout.decoder_parameters, timer=timer,
            extra={"output": {"shards": shards, "folder": output.destination.name},
                   "evaluation": evaluation,
                   "memory": {"max_decoder_layers_materialized": engine.max_materialized_layers,
                              "budget_bytes": budget, "activations_peak_bytes": store.peak_bytes,
                              "spilled_bytes": store.spilled_bytes + method.accumulated.spilled_bytes}},
        )
        _write_records(output.temporary, report, loaded, inputs.tuned)
        output.commit()
        state.remove()
    return _push(recipe, report, output.destination, overrides, progress)


def _evaluation_summary(recipe: Recipe, inputs: Inputs, evaluators: list, models: dict, chose_checkpoint: bool = False) -> dict:
    """The `evaluation` section of surgeon.json: what was measured, per model, and how fast; for a
    method that chooses a checkpoint, which rows chose it (`held_out`: the rows reported chose nothing)."""
    metric = evaluators[0].metric
    tokens = sum(e.stats.tokens for e in evaluators)
    seconds = sum(e.stats.seconds for e in evaluators)
    spec, choosing = recipe.evaluate, recipe.evaluate.select_on
    chosen_on = {name: ("evaluate.select_on." if getattr(choosing, name, None) else "evaluate.") + name
                 for name in ("task", "safety") if getattr(spec, name) is not None}
    return {
        **({"chosen_on": chosen_on, "held_out": all("select_on" in rows for rows in chosen_on.values())} if chose_checkpoint else {}),
        "judge": recipe.evaluate.safety.judge if recipe.evaluate.safety else None,
        "safety_prompts": len(inputs.safety or []),
        "metric": metric.name if metric else None,
        "higher_is_better": metric.higher_is_better if metric else None,
        "task_rows": len(inputs.evaluation[0]) if inputs.evaluation else 0,
        "models": models,
        "generation": {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_second": tokens / seconds if seconds else None},
    }


def _write_records(folder: Path, report: dict, loaded: LoadedRecipe, tuned) -> None:
    """The recipe as written, surgeon.json, report.md and the model card, beside the weights."""
    from surgeon.publish.card import render_card, tuned_card
    from surgeon.publish.plot import PLOT_NAME, write_tradeoff_plot
    from surgeon.report import render_markdown, write_report

    (folder / "recipe.yaml").write_text(loaded.text)
    write_report(folder / "surgeon.json", report)
    (folder / "report.md").write_text(render_markdown(report))
    plot = PLOT_NAME if "steps" in report and write_tradeoff_plot(report, folder) else None
    (folder / "README.md").write_text(render_card(report, loaded.text, tuned_card(tuned.folder), plot), encoding="utf-8")


def _push(recipe: Recipe, report: dict, folder: Path, overrides: RunOverrides, progress: Progress) -> dict:
    if recipe.output.push is not None:
        from surgeon.publish.push import push

        report["pushed"] = push(folder, recipe.output.push, overrides.force_push, progress)
    return report


def _run_baseline(loaded: LoadedRecipe, overrides: RunOverrides, progress: Progress) -> dict:
    """reset_layers and resta: write the transformed checkpoint, then evaluate it like any model."""
    from dataclasses import replace

    from transformers import AutoConfig, AutoTokenizer

    from surgeon.engine.layered import LayeredModel
    from surgeon.engine.layout import ModelLayout, build_skeleton
    from surgeon.engine.store import SpillStore
    from surgeon.evaluate.setup import Candidates
    from surgeon.io.atomic import AtomicOutputDir
    from surgeon.io.repaired import DTYPES, write_checkpoint
    from surgeon.methods.baselines import ResetLayers, Resta
    from surgeon.report import PhaseTimer, baseline_report

    recipe = loaded.recipe
    timer = PhaseTimer()
    with timer.phase("resolve"):
        inputs = resolve_inputs(loaded, progress)
    device = _device(overrides.device or recipe.compute.device)
    with AtomicOutputDir(destination(loaded, overrides), overrides.overwrite, _input_paths(loaded, inputs)) as output:
        config = AutoConfig.from_pretrained(inputs.tuned.config_folder)
        tokenizer_files = tokenizer_folder(inputs.tuned, inputs.base)
        tensors = inputs.tuned.tensors
        layout = ModelLayout.from_checkpoint(tensors.names(), {n: tensors.shape(n) for n in tensors.names()}, build_skeleton(config))
        probe_layer = layout.probe_layer(recipe.probe.layer)
        if recipe.method == "reset_layers":
            source = ResetLayers(inputs.base.tensors, tensors, layout, probe_layer)
            settings = {"method": "reset_layers", "probe_layer": probe_layer}
        else:
            source = Resta(inputs.base.tensors, tensors, inputs.unaligned.tensors, recipe.resta.scale)
            settings = {"method": "resta", "scale": recipe.resta.scale}
        settings.update(layers_L=layout.num_layers, device=device)
        with timer.phase("write"):
            shards = write_checkpoint(output.temporary, inputs.tuned, source.get, recipe.output.dtype,
                                      parse_size(recipe.output.max_shard_size), tokenizer_files, progress)
        changed = sorted(source.replaced if recipe.method == "reset_layers" else source.changed)
        evaluation = None
        with timer.phase("evaluate"):
            written = resolve_model(str(output.temporary))
            dtype = DTYPES[recipe.compute.dtype]
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_files)
            evaluators = {}
            for name, base_side in (("inputs", inputs.base), ("repaired", written)):
                engine = LayeredModel(config, base_side.tensors, inputs.tuned.tensors, SpillStore(_memory_budget(recipe.compute.max_memory, device),
                                      output.workspace / f"spill-{name}"), device, dtype, progress)
                candidates = Candidates(base_side, inputs.tuned, tokenizer_files, output.workspace / f"candidates-{name}")
                evaluator = build_evaluator(recipe.evaluate, recipe.probe.system_prompt, inputs.safety, inputs.evaluation, engine, tokenizer,
                                            candidates.loader(device, dtype, _generation_budget(recipe)),
                                            lambda ref: loaded.resolve(ref, may_be_hub_id=True), device, progress)
                evaluators[name] = (evaluator, candidates)
            if evaluators["inputs"][0] is not None:
                picks = {"base": lambda: evaluators["inputs"][1].base(), "tuned": lambda: evaluators["inputs"][1].tuned(),
                         "repaired": lambda: replace(evaluators["repaired"][1].base(), name="repaired")}
                models = {}
                for name in recipe.evaluate.models:
                    evaluator = evaluators["repaired" if name == "repaired" else "inputs"][0]
                    models[name] = evaluator.evaluate(picks[name]()).to_dict()
                evaluation = _evaluation_summary(recipe, inputs, [e for e, _ in evaluators.values()], models)
        report = baseline_report(
            recipe_sha256=loaded.sha256,
            inputs=_describe_inputs(loaded, inputs, progress),
            settings=settings,
            changed={"tensors": len(changed), "parameters": sum(_numel(tensors.shape(n)) for n in changed),
                     "share_of_N": sum(_numel(tensors.shape(n)) for n in changed if n in {x for l in layout.layer_tensors for x in l}) / layout.decoder_parameters},
            evaluation=evaluation, timer=timer, output={"shards": shards, "folder": output.destination.name},
        )
        _write_records(output.temporary, report, loaded, inputs.tuned)
        output.commit()
    return _push(recipe, report, output.destination, overrides, progress)


@dataclass
class EvalRequest:
    """`surgeon eval`: models, and the evaluate section (a recipe's, with flags over it)."""

    models: list[str]
    recipe: LoadedRecipe | None = None
    safety: str | None = None
    task: str | None = None
    metric: str | None = None
    judge: str | None = None
    judge_model: str | None = None
    limit: int | None = None
    batch_size: int | None = None
    max_new_tokens: int | None = None
    device: str | None = None


def _eval_spec(request: EvalRequest) -> Evaluate:
    """The recipe's evaluate section with the flags laid over it, validated like a recipe."""
    from pydantic import ValidationError

    from surgeon.errors import RecipeError

    spec = request.recipe.recipe.evaluate.model_dump() if request.recipe else {"safety": None, "task": None}
    if request.safety:
        spec["safety"] = {**(spec.get("safety") or {}), "path": request.safety, "prompts": None}
    if request.task:
        spec["task"] = {**(spec.get("task") or {}), "path": request.task}
    flags = {
        "safety": {"judge": request.judge, "model": request.judge_model, "limit": request.limit, "max_new_tokens": request.max_new_tokens},
        "task": {"metric": request.metric or (None if (spec.get("task") or {}).get("metric") else "exact_match"),
                 "limit": request.limit, "max_new_tokens": request.max_new_tokens},
    }
    for section, values in flags.items():
        if spec.get(section):
            spec[section].update({k: v for k, v in values.items() if v is not None})
    if request.batch_size:
        spec["batch_size"] = request.batch_size
    spec["select"], spec["select_on"] = "last_within_floor", None  # eval chooses no checkpoint
    try:
        return Evaluate.model_validate(spec)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise RecipeError(error["msg"].removeprefix("Value error, "), "evaluate." + ".".join(str(p) for p in error["loc"])) from None


def evaluate_models(request: EvalRequest, progress: Progress = NullProgress()) -> dict:
    """Harmful rate and task score of each model, side by side (generations cached on disk)."""
    import tempfile
    import time
    from dataclasses import replace

    from transformers import AutoConfig, AutoTokenizer

    from surgeon.data.datasets import column, load_rows
    from surgeon.engine.layered import LayeredModel
    from surgeon.engine.store import SpillStore
    from surgeon.evaluate.setup import Candidates
    from surgeon.io.repaired import DTYPES

    spec = _eval_spec(request)
    if spec.safety is None and spec.task is None:
        raise InputError("nothing to evaluate: give --safety and/or --task, or a recipe with an evaluate section", "surgeon eval")
    recipe = request.recipe.recipe if request.recipe else None
    resolve = (lambda ref, hub=False: request.recipe.resolve(ref, hub)) if request.recipe else (lambda ref, hub=False: ref)
    flagged = lambda ref: ref if ref in (request.safety, request.task) else resolve(ref)
    inputs = resolve_inputs(request.recipe, progress) if request.recipe else None
    safety_prompts = task_rows = None
    if spec.safety is not None:
        reference = flagged(spec.safety.path) if spec.safety.path else None
        safety_prompts = spec.safety.prompts[: spec.safety.limit] if reference is None else column(load_rows(reference), spec.safety.field, reference, spec.safety.limit)
    if spec.task is not None:
        reference = flagged(spec.task.path)
        rows = load_rows(reference)
        task_rows = (column(rows, spec.task.prompt_field, reference, spec.task.limit), column(rows, spec.task.answer_field, reference, spec.task.limit))
    if spec.task is not None and spec.task.metric == "kl" and inputs is None:
        raise InputError("metric kl compares against a tuned model: give --recipe", "--metric")
    device = _device(request.device or (recipe.compute.device if recipe else "auto"))
    dtype = DTYPES[recipe.compute.dtype if recipe else "float32"]
    system = recipe.probe.system_prompt if recipe else None
    results, totals = {}, {"tokens": 0, "seconds": 0.0}
    with tempfile.TemporaryDirectory(prefix="surgeon-eval-") as scratch:
        for index, reference in enumerate(request.models):
            started = time.perf_counter()
            if inputs is not None and reference in ("base", "tuned"):
                model = inputs.base if reference == "base" else inputs.tuned
            else:
                model = resolve_model(resolve(reference, True), base=inputs.base if inputs else None)
            kl = spec.task is not None and spec.task.metric == "kl"
            if kl:
                check_compatible(model, inputs.tuned)
            # kl compares against the recipe's tuned; otherwise the model stands on both sides (its
            # candidate has no masks, so base values are never read)
            base_side, tuned_side = (model, inputs.tuned) if kl else (model, model)
            tokenizer_files = tokenizer_folder(model, inputs.base if inputs else model)
            candidates = Candidates(base_side, tuned_side, tokenizer_files, Path(scratch) / f"m{index}")
            candidate = replace(candidates.base() if kl else candidates.tuned(), name=reference)
            engine = LayeredModel(AutoConfig.from_pretrained(model.config_folder), base_side.tensors if kl else model.tensors,
                                  tuned_side.tensors, SpillStore(_memory_budget(None, device), Path(scratch) / f"s{index}"), device, dtype, progress)
            evaluator = build_evaluator(spec, system, safety_prompts, task_rows, engine, AutoTokenizer.from_pretrained(tokenizer_files),
                                        candidates.loader(device, dtype, None), lambda ref: resolve(ref, True), device, progress)
            scores = evaluator.evaluate(candidate).to_dict()
            scores["seconds"] = time.perf_counter() - started
            results[reference] = scores
            totals["tokens"] += evaluator.stats.tokens
            totals["seconds"] += evaluator.stats.seconds
    metric = spec.task.metric if spec.task else None
    from surgeon.evaluate.metrics import parse_metric

    return {
        "judge": spec.safety.judge if spec.safety else None,
        "safety_prompts": len(safety_prompts or []),
        "metric": metric,
        "higher_is_better": parse_metric(metric).higher_is_better if metric else None,
        "task_rows": len(task_rows[0]) if task_rows else 0,
        "models": results,
        "generation": {**totals, "tokens_per_second": totals["tokens"] / totals["seconds"] if totals["seconds"] else None},
    }
