"""Is it the choice of weights or the amount? A repair against random restores of the same size.

Reads a finished `restore` repair (its masks.safetensors, and base and tuned from the recipe that
made it, by default the `.yaml` beside the repair folder), restores the same
number of weights in every tensor from base, but at positions drawn at random among those where
base and tuned differ, and judges tuned, the repair and the random control on the held-out sets
of bench/effectiveness.py (generations of models judged before come from the cache).

If the random control keeps tuned's harm, the gradient choice is what repairs; if it also keeps
tuned's task score, the weights the gradient picks carry task skill as well as the harm.

    python bench/random_control.py --repair /tmp/smollm2/n100-restore --data ../shared/data [--seed 0]

Prints the rows and adds them to examples/smollm2/results/random_control.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from effectiveness import judge_held_out

from surgeon.engine.masks import MaskSet
from surgeon.io.atomic import AtomicOutputDir
from surgeon.io.references import tokenizer_folder
from surgeon.io.repaired import write_repaired
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
    parser.add_argument("--repair", type=Path, required=True, help="output folder of a restore run")
    parser.add_argument("--recipe", type=Path, help="the repair's recipe (default: REPAIR.yaml, as bench/effectiveness.py writes it)")
    parser.add_argument("--data", type=Path, default=HERE.parents[1] / "shared" / "data")
    parser.add_argument("--sql-eval", type=Path, default=Path("/tmp/smollm2/sql_eval.jsonl"), help="written by bench/effectiveness.py")
    parser.add_argument("--eval", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    # the published surgeon.json names local inputs by folder name only; the recipe has their paths
    inputs = resolve_inputs(load_recipe(args.recipe or args.repair.with_suffix(".yaml")))
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

    compared = {"tuned": (tuned.reference, 0), "restore": (str(args.repair), masks.count()),
                f"random (seed {args.seed})": (str(folder), control.count())}
    scores = judge_held_out([reference for reference, _ in compared.values()], args.data, args.sql_eval, args.eval)
    rows = {name: {"weights_restored": count, **{k: scores[reference][k] for k in ("harmful_rate", "task_score")}}
            for name, (reference, count) in compared.items()}
    figures = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    figures[f"{args.repair.name} seed {args.seed}"] = rows
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
    for name, row in rows.items():
        print(f"| {args.repair.name} | {name} | {row['weights_restored']:,} | {row['harmful_rate']:.1%} | {row['task_score']:.3f} |")


if __name__ == "__main__":
    main()
