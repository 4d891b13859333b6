"""`surgeon pick`: rewrite a finished output at another checkpoint of its trade-off table.

A run of a method that scores checkpoints (restore) keeps each checkpoint's masks in the output
(`masks-step-N.safetensors`). Picking step N writes the checkpoint a run that chose step N would
have written (the same shard and masks bytes) from those masks, base and tuned, with no gradient
pass; the repaired model's row of the evaluation is judged again, and surgeon.json, report.md, the
card and the plot say which step is now written. The swap is atomic, like a run's.
"""

from __future__ import annotations

import shutil

from surgeon.errors import InputError
from surgeon.io.atomic import checkpoint_masks_name
from surgeon.progress import NullProgress, Progress
from surgeon.recipe.loader import LoadedRecipe
from surgeon.records import Changed, ModelScores, RunRecord, read_run_record


def pick(loaded: LoadedRecipe, step: int, output: str | None = None, progress: Progress = NullProgress()) -> RunRecord:
    """The output of `loaded` (or `output`) rewritten at checkpoint `step`; its new record."""
    from surgeon.context import ModelPair, ModelSettings, resolve_device
    from surgeon.engine.masks import MaskSet, write_repaired
    from surgeon.evaluation.evaluator import Candidate
    from surgeon.io.atomic import AtomicOutputDir
    from surgeon.io.references import tokenizer_folder
    from surgeon.methods.restore.record import Restored, RestoreRecord
    from surgeon.methods.restore.run import masks_summary
    from surgeon.patch import Patch, fingerprint_mismatches
    from surgeon.pipeline import SHOWN_ROWS, input_paths, write_records, destination, resolve_inputs
    from surgeon.recipe.options import RunOptions

    recipe = loaded.recipe
    folder = destination(loaded, RunOptions(output=output))
    report = read_run_record(folder)
    checkpoints = report.tradeoff.checkpoints if report.tradeoff else []
    steps = [c.step for c in checkpoints]
    if step not in steps or not (folder / checkpoint_masks_name(step)).is_file():
        kept = [s for s in steps if (folder / checkpoint_masks_name(s)).is_file()]
        raise InputError(f"no checkpoint {step} kept in this output; it has {', '.join(map(str, kept)) or 'none'}", str(folder))
    entry = next(c for c in checkpoints if c.step == step)
    if not entry.meets_floor and not recipe.output.write_below_floor:
        raise InputError(f"checkpoint {step} is past the task floor; set output.write_below_floor to write it anyway", "--step")
    inputs = resolve_inputs(loaded, progress)
    mismatches = fingerprint_mismatches(Patch.read(folder), {"base": inputs.base.describe(), "tuned": inputs.tuned.describe()})
    if mismatches:
        raise InputError(f"{'; '.join(mismatches)}: the recipe's models changed since the run", str(loaded.path))

    masks = MaskSet.load(folder / checkpoint_masks_name(step))
    with AtomicOutputDir(folder, True, input_paths(loaded, inputs)) as out:
        written = out.temporary
        for name in [p.name for p in folder.iterdir() if p.name.startswith("masks-step-") or p.name == "patch.json"]:
            shutil.copyfile(folder / name, written / name)
        masks.save(written / "masks.safetensors", {"step": str(step)})
        device = resolve_device(recipe.compute.device)
        settings = ModelSettings.of(recipe.compute, recipe.probe.system_prompt, lambda ref: loaded.resolve(ref, may_be_hub_id=True), device, progress,
                                    model=inputs.tuned)
        pair = ModelPair(inputs.base, inputs.tuned, tokenizer_folder(inputs.tuned, inputs.base), settings, out.workspace)
        shards = [] if recipe.output.write == "patch" else write_repaired(
            written, inputs.base, inputs.tuned, masks, recipe.output.dtype, recipe.output.max_shard_size, pair.tokenizer_files, progress)
        change, changed, restored = masks_summary(masks, pair.layout, report.settings["probe_layer"])
        report.change, report.changed = change, Changed(**changed)
        if isinstance(report.record, RestoreRecord):
            report.record.restored = Restored(**restored)
        report.tradeoff = report.tradeoff.choose(step)
        report.output.shards = shards
        report.picked = {"step": step, "by": "surgeon pick"}
        evaluation = report.evaluation
        if evaluation and "repaired" in evaluation.models:  # the model written is another: judged again
            evaluator = pair.evaluator(recipe.evaluate, inputs.safety, inputs.evaluation, inputs.benign, divergence=True)
            made = pair.candidates.repaired(masks)
            candidate = made if not shards else Candidate("repaired", masks, made.fingerprint, lambda: written)
            evaluation.models["repaired"] = ModelScores(**evaluator.evaluate(candidate).to_dict(), restored=masks.count())
            if "repaired" in evaluation.examples:
                evaluation.examples["repaired"] = evaluator.examples(candidate, SHOWN_ROWS)
            evaluator.release()
        write_records(written, report, loaded, inputs.tuned)
        out.commit()
    return report
