"""`surgeon plan`'s peak memory estimate against the peak RSS the OS measures for the same run.

Recipes: the quick start (examples/smollm2/recipe.yaml: SmolLM2-135M-Instruct, the README's first
command) and bench/scale.py's 1.1B bf16 pair (one restore step, no evaluation), both at the
default memory budget (compute.max_memory unset). Each run starts with an empty evaluation cache
(SURGEON_CACHE under --work), so every answer it judges is generated as a user's first run would.
The row keeps the estimate by part, the budget, the measured peak and their ratio.

    python bench/plan_accuracy.py [--recipes demo 1.1b] [--work /tmp/surgeon-plan-accuracy]

Writes bench/results/plan_accuracy.json; docs/benchmarks.md shows it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import pages  # noqa: E402
from gpu_check import write_pair  # noqa: E402
from scale import recipe as scale_recipe  # noqa: E402
from timed_run import surgeon_run  # noqa: E402

RESULTS = HERE / "results" / "plan_accuracy.json"
DEMO = HERE.parent / "examples" / "smollm2" / "recipe.yaml"


def recipe_path(name: str, work: Path) -> Path:
    if name == "demo":
        return DEMO
    base, tuned = write_pair(work, name, torch.bfloat16)
    path = work / f"{name}-bfloat16-default.yaml"
    path.write_text(yaml.safe_dump(scale_recipe(base, tuned, work / f"out-{name}", "default")))
    return path


def measure(name: str, work: Path) -> dict:
    from surgeon.plan import plan
    from surgeon.recipe import load_recipe

    path, out = recipe_path(name, work), work / f"out-{name}"
    estimate = plan(load_recipe(path), out, calibrate=False)
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    os.environ["SURGEON_CACHE"] = str(cache)  # the run's subprocess judges with nothing cached
    run = surgeon_run(path, "--output", str(out), "--fresh")
    report = json.loads((out / "surgeon.json").read_text())
    return {"recipe": str(path.relative_to(HERE.parent)) if path.is_relative_to(HERE.parent) else f"bench/scale.py's {name} bfloat16 pair",
            "budget_bytes": estimate.memory_budget_bytes, "estimate_bytes": estimate.peak_memory_bytes, "estimate_parts": estimate.memory,
            "peak_rss_gib": run.peak_rss_gib, "wall_seconds": run.wall_seconds, "graphs_kept": report["memory"]["graphs_kept"],
            "ratio": estimate.peak_memory_bytes / 2**30 / run.peak_rss_gib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=["demo", "1.1b"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/surgeon-plan-accuracy"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"rows": {}}
    results["command"] = "python bench/plan_accuracy.py"
    for name in args.recipes:
        row = measure(name, args.work)
        results["rows"][name] = row
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
        pages.write()
        print(f"{name}: surgeon plan {row['estimate_bytes'] / 2**30:.2f} GiB, measured peak RSS {row['peak_rss_gib']:.2f} GiB "
              f"({row['ratio']:.2f}x), budget {row['budget_bytes'] / 2**30:.2f} GiB, {row['graphs_kept']['layers']} layers' graphs kept, "
              f"wall {row['wall_seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
