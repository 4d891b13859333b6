"""Is it the choice of weights or the amount? A repair against random restores of the same size.

Reads a finished `restore` repair of bench/effectiveness.py (WORK/SCENARIO-TASK-nN-restore: its
masks.safetensors, and base and tuned from the recipe beside it), restores the same number of
weights in every tensor from base, but at positions drawn at random among those where base and
tuned differ, and judges tuned, the repair and the random control on the reported rows of
bench/effectiveness.py (generations of models judged before come from the cache), with the paired
difference of the repair from the control on the same rows.

If the random control keeps tuned's harm, the gradient choice is what repairs; if it also keeps
tuned's task score, the weights the gradient picks carry task skill as well as the harm.

    python bench/random_control.py --repair /tmp/smollm2/smollm2-lora-sql-n100-restore --data ../shared/data [--seed 0]

Prints the rows and adds them to examples/smollm2/results/random_control.json.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
from effectiveness import TASKS, paired, per_row, reported_scores, verdict

from surgeon.engine.masks import MaskSet
from surgeon.io.atomic import AtomicOutputDir
from surgeon.io.references import tokenizer_folder
from surgeon.engine.masks import write_repaired
from surgeon.pipeline import resolve_inputs
from surgeon.recipe import load_recipe
from surgeon.recipe.sizes import parse_size
from surgeon.report import tool_identity

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "examples" / "smollm2" / "results" / "random_control.json"


def random_masks(masks, base, tuned, seed: int):
    """Per tensor, as many set bits as `masks` has, uniformly among the entries base and tuned differ in."""
    generator = torch.Generator().manual_seed(seed)
    control = MaskSet(masks.shapes)
    for name in masks.names():
        count = masks.count(name)
        if count:
            differ = (base.tensors.get(name) != tuned.tensors.get(name)).flatten().nonzero().squeeze(1)
            control.set(name, differ[torch.randperm(len(differ), generator=generator)[:count]])
    return control


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repair", type=Path, required=True, help="a restore output of bench/effectiveness.py: WORK/TASK-nN-restore")
    parser.add_argument("--data", type=Path, default=HERE.parents[1] / "shared" / "data")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    named = re.fullmatch(r"((?:.+-)?(\w+)-n\d+)-restore", args.repair.name)
    if named is None or named.group(2) not in TASKS:
        parser.error(f"--repair {args.repair}: expected a folder [SCENARIO-]TASK-nN-restore written by bench/effectiveness.py")
    task, work = named.group(2), args.repair.parent
    fine_tune = work / f"{named.group(1)}.yaml"  # written by bench/effectiveness.py: its tuned is what KL is measured from

    # the published surgeon.json names local inputs by folder name only; the recipe has their paths
    inputs = resolve_inputs(load_recipe(args.repair.with_suffix(".yaml")))
    base, tuned = inputs.base, inputs.tuned
    masks = MaskSet.load(args.repair / "masks.safetensors")
    control = random_masks(masks, base, tuned, args.seed)
    folder = args.repair.with_name(f"{args.repair.name}-random{args.seed}")
    with AtomicOutputDir(folder, overwrite=True) as output:
        write_repaired(output.temporary, base, tuned, control, None, parse_size("200MB"), tokenizer_folder(tuned, base))
        # a surgeon.json makes the folder a surgeon output, which the next run of this bench may replace
        record = {"tool": tool_identity(), "method": "random_control", "of": args.repair.name, "seed": args.seed, "restored": control.count()}
        (output.temporary / "surgeon.json").write_text(json.dumps(record, indent=2) + "\n")
        output.commit()

    compared = {"tuned": ("tuned", 0), "restore": (str(args.repair), masks.count()), f"random (seed {args.seed})": (str(folder), control.count())}
    rows, values = {}, {}
    for name, (reference, count) in compared.items():
        scores, answers = reported_scores(reference, fine_tune, args.data, work, task)
        values[name] = per_row(answers, TASKS[task]["metric"])
        rows[name] = {"weights_restored": count, "harmful_rate": scores["harmful_rate"], "degenerate": scores["degenerate"],
                      "beavertails_harmful_rate": scores["beavertails"]["harmful_rate"], "over_refusal": scores["over_refusal"],
                      "kl_from_tuned": scores["kl_from_tuned"], "task_score": scores["task_score"]}
    rows["restore"]["paired_with_random"] = paired(values["restore"], values[f"random (seed {args.seed})"], TASKS[task]["metric"])
    figures = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    figures[f"{args.repair.name} seed {args.seed}"] = rows
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
    for name, row in rows.items():
        print(f"| {args.repair.name} | {name} | {row['weights_restored']:,} | {row['harmful_rate']:.1%} | {row['degenerate']:.1%} "
              f"| {row['beavertails_harmful_rate']:.1%} | {row['task_score']:.3f} |")
    comparison = rows["restore"]["paired_with_random"]
    print(f"restore minus random, same rows: HarmBench {verdict(comparison, 'harmbench', True)}; task {verdict(comparison, 'task', False, False)}")


if __name__ == "__main__":
    main()
