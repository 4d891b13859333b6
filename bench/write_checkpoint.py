"""Write the model one checkpoint of a run's saved state describes: base's values where its masks
are set, tuned's elsewhere (as `surgeon run` writes its chosen one). For judging a checkpoint of a
run that has not finished: its saved state (`.NAME.surgeon-state/checkpoints/`) keeps every
checkpoint's masks.

    python bench/write_checkpoint.py BASE TUNED MASKS OUT
"""

import argparse
from pathlib import Path

from surgeon.engine.masks import MaskSet
from surgeon.io.atomic import AtomicOutputDir
from surgeon.io.references import resolve_model, tokenizer_folder
from surgeon.engine.masks import write_repaired

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("base", help="the recipe's base (a folder, or model+adapter)")
parser.add_argument("tuned", help="the recipe's tuned")
parser.add_argument("masks", type=Path, help="a checkpoint's masks (checkpoint-SEGMENT-STEP.safetensors)")
parser.add_argument("out", type=Path, help="a new folder")
args = parser.parse_args()
base = resolve_model(args.base)
tuned = resolve_model(args.tuned, base=base)
with AtomicOutputDir(args.out) as output:  # written beside OUT and renamed into place
    write_repaired(output.temporary, base, tuned, MaskSet.load(args.masks), None, 200 * 10**6, tokenizer_folder(tuned, base))
    output.commit()
print(f"written {args.out}")
