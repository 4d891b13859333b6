"""`surgeon run` and `surgeon validate` as functions: recipe in, repaired folder out."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from surgeon import processes
from surgeon.errors import InputError, OutputError
from surgeon.io.atomic import checkpoint_masks_name
from surgeon.data.datasets import HarmfulPrompts
from surgeon.io.preflight import check_compatible, mismatches
from surgeon.io.references import ResolvedModel, local_name, resolve_model, tokenizer_folder
from surgeon.progress import NullProgress, Progress
from surgeon.recipe import LoadedRecipe
from surgeon.recipe.options import EvalOptions, RunOptions
from surgeon.recipe.schema import Evaluate, PromptSet, Recipe, SafetyEvalSet, TaskEvalSet
from surgeon.records import Evaluation, RunRecord


SHOWN_ROWS = 3  # rows of each set whose answers report.md shows


@dataclass
class Inputs:
    base: ResolvedModel
    tuned: ResolvedModel
    harmful: list[str]
    task: list[str]
    evaluation: tuple[list[str], list[str]] | None
    safety: HarmfulPrompts | None = None
    unaligned: ResolvedModel | None = None
    task_answers: list[str] | None = None  # data.task's answers, for a rollback on their loss
    choosing_evaluation: tuple[list[str], list[str]] | None = None  # evaluate.choosing()'s rows
    choosing_safety: HarmfulPrompts | None = None
    benign: list | None = None  # evaluate.benign's prompts: over-refusal in the final table


@contextmanager
def _naming(field_name: str, loaded: LoadedRecipe | None = None):
    """An input error inside names the recipe field too, and the file and line that set it (a
    shipped or extended recipe's placeholder is set there, not in the user's file)."""
    try:
        yield
    except InputError as exc:
        origin = loaded.origin(field_name) if loaded is not None else None
        raise type(exc)(exc.message, f"{field_name}: {exc.where}" + (f"; set at {origin}" if origin else "")) from None


def _inline(prompt_set: PromptSet | SafetyEvalSet) -> list[str]:
    return prompt_set.prompts[: prompt_set.limit] if prompt_set.limit else list(prompt_set.prompts)


def harmful_prompts(spec: SafetyEvalSet, reference: str | None) -> HarmfulPrompts:
    """A safety set's prompts (inline, or from the file at `reference`) and their categories."""
    from surgeon.data.datasets import column, load_rows, prompt_column

    if reference is None:
        return HarmfulPrompts(_inline(spec))
    rows = load_rows(reference)
    categories = column(rows, spec.category_field, reference, spec.limit) if spec.category_field else None
    return HarmfulPrompts(prompt_column(rows, spec.field, reference, spec.limit), categories)


def _harmful(loaded: LoadedRecipe, spec: SafetyEvalSet, field_name: str) -> HarmfulPrompts:
    with _naming(field_name, loaded):
        return harmful_prompts(spec, loaded.resolve(spec.path) if spec.path else None)


def prompt_rows(prompt_set: PromptSet, reference: str | None, answer_field: str | None = None) -> tuple[list, list[str] | None]:
    """A prompt set's prompts (inline, or from the file at `reference`), and the answers in
    `answer_field` when it names one."""
    from surgeon.data.datasets import answer_column, load_rows, prompt_column

    if reference is None:
        return _inline(prompt_set), None
    rows = load_rows(reference)
    answers = answer_column(rows, answer_field, reference, prompt_set.limit, prompt_set.field) if answer_field else None
    return prompt_column(rows, prompt_set.field, reference, prompt_set.limit), answers


def _prompts(loaded: LoadedRecipe, prompt_set: PromptSet, field_name: str, answer_field: str | None = None) -> tuple[list, list[str] | None]:
    """`prompt_rows` of a recipe field, its errors naming the field."""
    with _naming(field_name, loaded):
        return prompt_rows(prompt_set, loaded.resolve(prompt_set.path) if prompt_set.path else None, answer_field)


def _model(loaded: LoadedRecipe, spec, field_name: str, base: ResolvedModel | None = None) -> ResolvedModel:
    """A recipe's model reference resolved; an error names the recipe field too."""
    with _naming(field_name, loaded):
        return resolve_model(loaded.resolve(spec.path, may_be_hub_id=True), spec.allow_pickle, base=base, any_base=spec.any_base)


def resolve_inputs(loaded: LoadedRecipe, progress: Progress = NullProgress()) -> Inputs:
    """Models, adapters and datasets of a recipe, checked against each other from headers only."""
    recipe = loaded.recipe
    progress.log("resolving models and data")
    base = _model(loaded, recipe.base, "base")
    tuned = _model(loaded, recipe.tuned, "tuned", base)
    if tuned.adapter_of is None and tuned.folder.resolve() == base.folder.resolve():
        raise InputError("tuned is the same model as base: there is nothing to repair", "tuned")
    check_compatible(base, tuned)
    unaligned = None
    if recipe.unaligned is not None:
        unaligned = _model(loaded, recipe.unaligned, "unaligned", base)
        check_compatible(base, unaligned)
    evaluation = _task_rows(loaded, recipe.evaluate.task, "evaluate.task")
    safety = _harmful(loaded, recipe.evaluate.safety, "evaluate.safety") if recipe.evaluate.safety else None
    harmful, _ = _prompts(loaded, recipe.data.harmful, "data.harmful") if recipe.data else ([], None)
    task, task_answers = _prompts(loaded, recipe.data.task, "data.task", recipe.data.task.answer_field) if recipe.data else ([], None)
    choosing = recipe.evaluate.select_on
    return Inputs(
        base, tuned, harmful, task, evaluation, safety, unaligned, task_answers,
        choosing_evaluation=_task_rows(loaded, choosing.task, "evaluate.select_on.task") if choosing and choosing.task else evaluation,
        choosing_safety=_harmful(loaded, choosing.safety, "evaluate.select_on.safety") if choosing and choosing.safety else safety,
        benign=_prompts(loaded, recipe.evaluate.benign, "evaluate.benign")[0] if recipe.evaluate.benign else None,
    )


def _task_rows(loaded: LoadedRecipe, spec: TaskEvalSet | None, field_name: str) -> tuple[list, list[str]] | None:
    if spec is None:
        return None
    with _naming(field_name, loaded):
        return task_rows(spec, loaded.resolve(spec.path))


def task_rows(spec: TaskEvalSet, reference: str) -> tuple[list, list[str]]:
    """A task set's prompts and reference answers (a messages column gives both)."""
    from surgeon.data.datasets import answer_column, load_rows, prompt_column

    rows = load_rows(reference)
    return (prompt_column(rows, spec.prompt_field, reference, spec.limit),
            answer_column(rows, spec.answer_field, reference, spec.limit, spec.prompt_field))


def destination(loaded: LoadedRecipe, overrides: RunOptions) -> Path:
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
    if recipe.evaluate.benign is not None:
        references["evaluate.benign"] = recipe.evaluate.benign.path
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


def input_paths(loaded: LoadedRecipe, inputs: Inputs) -> list[Path]:
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
    for role in models:
        if getattr(loaded.recipe, role).any_base:
            described[role]["any_base"] = True
    return described


def validate(loaded: LoadedRecipe, progress: Progress = NullProgress()) -> dict:
    """Schema (already checked by loading), references, datasets and the preflight; no heavy work."""
    from surgeon.engine.layout import ModelLayout, build_skeleton
    from surgeon.io import hf_loading

    inputs = resolve_inputs(loaded, progress)
    tensors = inputs.tuned.tensors
    config = hf_loading.config(inputs.tuned.config_folder)
    layout = ModelLayout.from_checkpoint(tensors.names(), {n: tensors.shape(n) for n in tensors.names()}, build_skeleton(config))
    return {
        **layout.facts(loaded.recipe.probe.layer, loaded.recipe.restore.sparsity, tensors.shape),
        "harmful_prompts": len(inputs.harmful),
        "task_prompts": len(inputs.task),
        "safety_prompts": len(inputs.safety.prompts) if inputs.safety else 0,
        "evaluation_rows": len(inputs.evaluation[0]) if inputs.evaluation else 0,
    }


def run(loaded: LoadedRecipe, overrides: RunOptions = RunOptions(), progress: Progress = NullProgress()) -> RunRecord:
    """Repair with the recipe's method, write atomically, evaluate, return the report (also saved
    as surgeon.json and report.md). Every method runs through this one path."""
    import torch

    from surgeon.context import resolve_device
    from surgeon.methods.registry import method_spec
    from surgeon.report import PhaseTimer

    recipe: Recipe = loaded.recipe
    spec = method_spec(recipe.method)
    timer = PhaseTimer()
    torch.manual_seed(recipe.seed)
    with timer.phase("resolve"):
        inputs = resolve_inputs(loaded, progress)
    device, collective = processes.start(resolve_device(overrides.device or recipe.compute.device))
    try:
        return _run(loaded, spec, inputs, device, collective, overrides, timer, progress)
    finally:
        collective.stop()


def _run(loaded: LoadedRecipe, spec, inputs: Inputs, device: str, collective: processes.Collective, overrides: RunOptions, timer,
         progress: Progress) -> RunRecord:
    """`run` past resolving: in a data-parallel run every process repairs and evaluates its
    share; the main process alone writes the saved state, the output and its records, and pushes."""
    from surgeon.context import ModelPair, ModelSettings, RunContext
    from surgeon.io.atomic import AtomicOutputDir
    from surgeon.io.run_state import RunState, state_folder
    from surgeon.report import build_record, tool_identity

    recipe: Recipe = loaded.recipe
    main = collective.is_main
    with AtomicOutputDir(destination(loaded, overrides), overrides.overwrite, input_paths(loaded, inputs), lock=main) as output:
        with timer.phase("resolve"):  # after the destination check: hashing a large local model takes minutes
            described = _describe_inputs(loaded, inputs, progress)
        base, tuned = described["base"].get("local"), described["tuned"].get("local")  # content hashes, now known
        if base and tuned and sorted(base.values()) == sorted(tuned.values()):
            raise InputError("tuned holds the same weights and config as base: there is nothing to repair", "tuned")
        # what a saved state must match to be resumed: this recipe, these inputs' contents, this device and surgeon
        key = {"recipe_sha256": loaded.sha256, "inputs": {field: d.get("revision") or d.get("local") for field, d in described.items()},
               "device": device, "surgeon": tool_identity()}
        if main:
            state = RunState.open(state_folder(output.destination), key, overrides.fresh, progress)
        collective.barrier()
        if not main:
            state = RunState.open(state_folder(output.destination), key, writer=False)
        with timer.phase("prepare"):
            settings = ModelSettings.of(recipe.compute, recipe.probe.system_prompt, lambda ref: loaded.resolve(ref, may_be_hub_id=True),
                                        device, progress, collective, inputs.tuned)
            pair = ModelPair(inputs.base, inputs.tuned, tokenizer_folder(inputs.tuned, inputs.base), settings, output.workspace)
            context = RunContext(recipe, inputs, pair, output.workspace, state, progress)
            method = spec.build(context)
        with timer.phase("repair"):
            repair = method.run()
        context.method_done()
        with timer.phase("write"):
            shards = _write_repair(repair, context, output.temporary)
            if (repair.masks is not None or recipe.output.write == "patch") and main:  # the repair itself, for `surgeon apply`
                from surgeon.patch import MANIFEST, manifest

                kind = "masks" if repair.masks is not None else "tensors"
                (output.temporary / MANIFEST).write_text(json.dumps(
                    manifest(kind, spec.name, described, recipe.output.dtype, recipe.output.max_shard_size, tool_identity()), indent=2) + "\n")
        change, changed, record = repair.summary()
        evaluation = None
        if context.evaluator is not None:
            with timer.phase("evaluate"):
                evaluation = _final_evaluation(context, repair, output.temporary)
        layout = pair.layout
        activations = pair.__dict__.get("activations")  # built only if a pass or a streamed metric ran
        stores = [s for s in (activations, *context.stores) if s is not None]
        report = build_record(
            method=spec.name, recipe_sha256=loaded.sha256, inputs=described,
            settings={**repair.settings, "layers_L": layout.num_layers, "device": device, "compute_dtype": recipe.compute.dtype,
                      "world_size": collective.world_size},
            change=change, changed=changed, tradeoff=repair.tradeoff, record=record, evaluation=evaluation, decoder_parameters=layout.decoder_parameters, timer=timer,
            output={"shards": shards, "folder": output.destination.name},
            memory={"max_decoder_layers_materialized": pair.engine.max_materialized_layers, "budget_bytes": settings.budget,
                    "graphs_kept": {"layers": pair.engine.kept_graph_layers, "bytes": pair.engine.kept_graph_bytes},
                    "activations_peak_bytes": activations.peak_bytes if activations is not None else 0,
                    "spilled_bytes": sum(store.spilled_bytes for store in stores)},
        )
        collective.barrier()  # every process is past the saved checkpoints before they go
        if not main:
            return report
        write_records(output.temporary, report, loaded, inputs.tuned)
        output.commit()
        state.remove()
    return _push(recipe, report, output.destination, overrides, progress)


def _write_repair(repair, context, folder: Path) -> list[str]:
    """The repaired checkpoint in tuned's names and layout, and the masks when the method chose weights."""
    from surgeon.engine.masks import write_repaired
    from surgeon.io.repaired import write_checkpoint

    recipe, pair = context.recipe, context.pair
    shard_bytes = recipe.output.max_shard_size
    if repair.masks is None and recipe.output.write == "patch":
        from surgeon.patch import write_tensor_patch

        write_tensor_patch(folder, pair.tuned, repair.tensors, recipe.output.dtype, context.workspace, context.settings.stores_bytes)
        return []
    if repair.masks is None:
        return write_checkpoint(folder, pair.tuned, repair.tensors, recipe.output.dtype, shard_bytes, pair.tokenizer_files, context.progress)
    for step, path in repair.checkpoints.items():  # for `surgeon pick`: another checkpoint without a gradient pass
        shutil.copyfile(path, folder / checkpoint_masks_name(step))
    repair.masks.save(folder / "masks.safetensors", repair.masks_metadata)
    if recipe.output.write == "patch":
        return []
    return write_repaired(folder, pair.base, pair.tuned, repair.masks, recipe.output.dtype, shard_bytes, pair.tokenizer_files, context.progress)


def _final_evaluation(context, repair, written: Path) -> Evaluation:
    """The models table: base and tuned through the run's evaluator; the repaired model as
    written. A mask-based repair is the run's pair with its masks (its answers may be cached
    from checkpoint scoring); any other is a pair of its own over the written folder."""
    from dataclasses import replace

    from surgeon.context import ModelPair
    from surgeon.evaluation.evaluator import Candidate

    recipe, inputs, pair, evaluator = context.recipe, context.inputs, context.pair, context.evaluator
    if repair.masks is not None:
        repaired_evaluator = evaluator
        # generation loads the checkpoint written; a patch alone has none, so one is made in the workspace
        made = pair.candidates.repaired(repair.masks)
        repaired = (lambda: made) if recipe.output.write == "patch" else (lambda: Candidate("repaired", repair.masks, made.fingerprint, lambda: written))
    else:
        if recipe.output.write == "patch":  # no checkpoint written: the patch applied in the workspace stands for it
            from surgeon.io.repaired import write_checkpoint
            from surgeon.patch import FILES, patched

            get, _ = patched(written / FILES["tensors"], pair.tuned)
            written = context.workspace / "patched"
            written.mkdir(parents=True, exist_ok=True)
            write_checkpoint(written, pair.tuned, get, recipe.output.dtype, recipe.output.max_shard_size, pair.tokenizer_files, context.progress)
        own = ModelPair(resolve_model(str(written)), pair.tuned, pair.tokenizer_files, pair.settings, context.workspace / "written")
        repaired_evaluator = own.evaluator(recipe.evaluate, inputs.safety, inputs.evaluation, inputs.benign, divergence=True)
        repaired = lambda: replace(own.candidates.base(), name="repaired")
    picks = {"base": pair.candidates.base, "tuned": pair.candidates.tuned, "repaired": repaired}
    models, examples = {}, {}
    for name in recipe.evaluate.models:
        judged_by, candidate = (repaired_evaluator if name == "repaired" else evaluator), picks[name]()
        models[name] = judged_by.evaluate(candidate).to_dict()
        if name != "base":  # what tuned and the repair answer, side by side in report.md
            examples[name] = judged_by.examples(candidate, SHOWN_ROWS)
    if repair.masks is not None and "repaired" in models:
        models["repaired"]["restored"] = repair.masks.count()
    evaluators = list({id(e): e for e in (evaluator, context.chooser if context.chose else evaluator, repaired_evaluator)}.values())
    return _evaluation_summary(recipe, inputs, evaluators, models, chose_checkpoint=context.chose).model_copy(update={"examples": examples})


def _evaluation_summary(recipe: Recipe, inputs: Inputs, evaluators: list, models: dict, chose_checkpoint: bool = False) -> Evaluation:
    """The `evaluation` section of surgeon.json: what was measured, per model, and how fast; for a
    method that chooses a checkpoint, which rows chose it (`held_out`: the rows reported chose nothing)."""
    metric = evaluators[0].metric
    tokens = sum(e.stats.tokens for e in evaluators)
    seconds = sum(e.stats.seconds for e in evaluators)
    spec, choosing = recipe.evaluate, recipe.evaluate.select_on
    chosen_on = {name: ("evaluate.select_on." if getattr(choosing, name, None) else "evaluate.") + name
                 for name in ("task", "safety") if getattr(spec, name) is not None}
    reported = inputs.safety.prompts if inputs.safety else []
    return Evaluation(
        **({"chosen_on": chosen_on, "held_out": all("select_on" in rows for rows in chosen_on.values())} if chose_checkpoint else {}),
        judge=recipe.evaluate.safety.judge if recipe.evaluate.safety else None,
        # how many reported harmful prompts also probed the repair or chose its checkpoint: the card
        # calls the rows held out only when both are 0
        safety_shared={"probe": _shared(reported, inputs.harmful),
                       "choosing": _shared(reported, inputs.choosing_safety.prompts) if chose_checkpoint and inputs.choosing_safety else 0},
        safety_prompts=len(inputs.safety.prompts) if inputs.safety else 0,
        benign_prompts=len(inputs.benign) if inputs.benign else 0,
        metric=metric.name if metric else None,
        higher_is_better=metric.higher_is_better if metric else None,
        task_rows=len(inputs.evaluation[0]) if inputs.evaluation else 0,
        models=models,
        generation={"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_second": tokens / seconds if seconds else None},
    )


def _shared(reported: list, other: list) -> int:
    """How many of the reported prompts the other set holds too, by content (case and spacing aside;
    a conversation by all its turns)."""
    text = lambda prompt: prompt if isinstance(prompt, str) else "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
    same = lambda prompt: " ".join(text(prompt).split()).casefold()
    held = {same(p) for p in other}
    return sum(same(p) in held for p in reported)


def write_records(folder: Path, report: RunRecord, loaded: LoadedRecipe, tuned) -> None:
    """The recipe as written, surgeon.json, report.md and the model card, beside the weights."""
    from surgeon.publish.card import render_card, tuned_card
    from surgeon.publish.plot import PLOT_NAME, write_tradeoff_plot
    from surgeon.report import render_markdown

    (folder / "recipe.yaml").write_text(loaded.text)
    report.write(folder / "surgeon.json")
    (folder / "report.md").write_text(render_markdown(report))
    plot = PLOT_NAME if write_tradeoff_plot(report, folder) else None
    (folder / "README.md").write_text(render_card(report, loaded.text, tuned_card(tuned.folder), plot), encoding="utf-8")


def _push(recipe: Recipe, report: RunRecord, folder: Path, overrides: RunOptions, progress: Progress) -> RunRecord:
    if recipe.output.push is not None:
        from surgeon.publish.push import push

        report.pushed = push(folder, recipe.output.push, overrides.force_push, progress)
    return report


@dataclass
class EvalRequest:
    """`surgeon eval`: models, and the evaluate section (a recipe's, with the options over it)."""

    models: list[str]
    recipe: LoadedRecipe | None = None
    options: EvalOptions = EvalOptions()


def _eval_spec(request: EvalRequest) -> Evaluate:
    """The recipe's evaluate section with the flags laid over it, validated like a recipe."""
    from pydantic import ValidationError

    from surgeon.errors import RecipeError

    # without a recipe, the schema's defaults: harm measured on the shipped set (over-refusal when asked)
    spec = request.recipe.recipe.evaluate.model_dump() if request.recipe else {"benign": None}
    if request.options.benign:
        spec["benign"] = None if request.options.benign == "none" else {"path": request.options.benign}
    if request.options.safety == "none":
        spec["safety"] = None
    elif request.options.safety:
        # another file: the judge and its settings carry over, the columns of the recipe's file do not
        # (--prompt-field and --category-field name this one's)
        spec["safety"] = {**(spec.get("safety") or {}), "path": request.options.safety, "prompts": None, "category_field": None, "field": "prompt"}
    if request.options.task:
        spec["task"] = {**(spec.get("task") or {}), "path": request.options.task}
    options = request.options
    flags = {
        "safety": {"judge": options.judge, "model": options.judge_model, "limit": options.limit, "field": options.prompt_field,
                   "max_new_tokens": options.max_new_tokens, "category_field": options.category_field},
        "task": {"metric": options.metric or (None if (spec.get("task") or {}).get("metric") else "exact_match"),
                 "limit": options.limit, "max_new_tokens": options.max_new_tokens,
                 "prompt_field": options.prompt_field, "answer_field": options.answer_field, "allow_code": options.allow_code or None},
        "benign": {"limit": options.limit, "max_new_tokens": options.max_new_tokens, "field": options.prompt_field},
    }
    for section, values in flags.items():
        if spec.get(section):
            spec[section].update({k: v for k, v in values.items() if v is not None})
    if request.options.batch_size:
        spec["batch_size"] = request.options.batch_size
    spec["select"], spec["select_on"] = "last_within_floor", None  # eval chooses no checkpoint
    try:
        return Evaluate.model_validate(spec)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise RecipeError(error["msg"].removeprefix("Value error, "), "evaluate." + ".".join(str(p) for p in error["loc"])) from None


ANSWER_KEYS = ("model", "set", "row")  # the first keys of every line of an answers file


def _answers_destination(path: Path) -> Path:
    """Where `surgeon eval --answers` writes: a new file, or one it wrote before (checked before
    any answer is generated; nothing else is replaced)."""
    if path.is_dir():
        raise InputError("is a folder: give a file name for the answers", str(path))
    if path.exists():
        with path.open("rb") as file:
            first = file.readline(1 << 20)
        try:
            earlier = tuple(json.loads(first))[:3] == ANSWER_KEYS
        except (ValueError, TypeError):
            earlier = False
        if not earlier:
            raise InputError("exists and is not an answers file surgeon wrote: refusing to replace it", str(path))
    if not path.parent.is_dir():
        raise InputError("no such folder for the answers file", str(path.parent))
    return path


def _write_answers(path: Path, rows: list[dict]) -> None:
    """One JSON line per model and prompt, written beside and renamed into place (a reader never
    sees half of it)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise OutputError(f"cannot write the answers: {exc.strerror or exc}", str(path)) from None


def evaluate_models(request: EvalRequest, progress: Progress = NullProgress()) -> Evaluation:
    """Harmful rate and task score of each model, side by side (generations cached on disk)."""
    import tempfile
    import time
    from dataclasses import replace

    from surgeon.context import ModelPair, ModelSettings, resolve_device

    spec = _eval_spec(request)
    if spec.safety is None and spec.task is None:
        raise InputError("nothing to evaluate: harm is off (--safety none) and no --task is given", "surgeon eval")
    recipe = request.recipe.recipe if request.recipe else None
    resolve = (lambda ref, hub=False: request.recipe.resolve(ref, hub)) if request.recipe else (lambda ref, hub=False: ref)
    flagged = lambda ref: ref if ref in (request.options.safety, request.options.task) else resolve(ref)
    inputs = resolve_inputs(request.recipe, progress) if request.recipe else None
    safety_prompts = rows = benign = None
    if spec.benign is not None:
        benign, _ = prompt_rows(spec.benign, flagged(spec.benign.path) if spec.benign.path else None)
    if spec.safety is not None:
        safety_prompts = harmful_prompts(spec.safety, flagged(spec.safety.path) if spec.safety.path else None)
    if spec.task is not None:
        rows = task_rows(spec.task, flagged(spec.task.path))
    if spec.task is not None and spec.task.metric == "kl" and inputs is None:
        raise InputError("metric kl compares against a tuned model: give --recipe", "--metric")
    from surgeon.recipe.schema import Compute

    device = resolve_device(request.options.device or (recipe.compute.device if recipe else "auto"))
    # the recipe's compute section where one is given (max_memory included), else the defaults
    settings = ModelSettings.of(recipe.compute if recipe else Compute(), recipe.probe.system_prompt if recipe else None,
                                lambda ref: resolve(ref, True), device, progress, model=inputs.tuned if inputs else None)
    results, totals = {}, {"tokens": 0, "seconds": 0.0}
    answers = None
    if request.options.answers:
        answers_file = _answers_destination(Path(request.options.answers))
        answers = []
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
            # against the recipe's tuned where the model matches it (the kl metric, and the KL on
            # harmless prompts); otherwise the model stands on both sides (its candidate has no
            # masks, so base values are never read)
            against = inputs is not None and (kl or not mismatches(model, inputs.tuned))
            pair = ModelPair(model, inputs.tuned if against else model, tokenizer_folder(model, inputs.base if inputs else model),
                             settings, Path(scratch) / f"m{index}")
            candidate = replace(pair.candidates.base() if against else pair.candidates.tuned(), name=reference)
            # every answer written whole is generated whole once, and scored from the same text
            evaluator = pair.evaluator(spec, safety_prompts, rows, benign, divergence=against, stop_early=answers is None)
            measured = evaluator.evaluate(candidate)
            scores = measured.to_dict()
            if request.options.show:
                scores["examples"] = evaluator.examples(candidate, request.options.show)
            if answers is not None:
                answers += [{"model": reference, "set": kind, "row": i, **row}
                            for kind, rows in evaluator.examples(candidate).items() for i, row in enumerate(rows)]
            scores["seconds"] = time.perf_counter() - started
            if index == 0:
                first = measured
            else:  # paired on the same rows: what the rows say of the difference from the first model
                scores["change_from_first"] = measured.change_from(first, evaluator.metric.aggregate if evaluator.metric else None)
            results[reference] = scores
            totals["tokens"] += evaluator.stats.tokens
            totals["seconds"] += evaluator.stats.seconds
    if answers is not None:
        _write_answers(answers_file, answers)
    metric = spec.task.metric if spec.task else None
    from surgeon.evaluation.metrics import parse_metric

    return Evaluation(
        judge=spec.safety.judge if spec.safety else None,
        safety_prompts=len(safety_prompts.prompts) if safety_prompts else 0,
        benign_prompts=len(benign) if benign else 0,
        metric=metric,
        higher_is_better=parse_metric(metric).higher_is_better if metric else None,
        task_rows=len(rows[0]) if rows else 0,
        models=results,
        generation={**totals, "tokens_per_second": totals["tokens"] / totals["seconds"] if totals["seconds"] else None},
    )
