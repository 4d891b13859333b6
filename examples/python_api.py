"""surgeon from Python, end to end in seconds on the tiny random models of examples/tiny:
a recipe built in code, a repair, and the models side by side.

    python -m surgeon.tiny examples/tiny/models
    python examples/python_api.py [--tiny examples/tiny] [--output examples/tiny/repaired]

A training script calls the same functions right after `trainer.train()`, with its own base, tuned
and task data in the recipe.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import surgeon

TINY = Path(__file__).resolve().parent / "tiny"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", type=Path, default=TINY, help="the folder of the tiny example: models/, harmful.jsonl, task.jsonl")
    parser.add_argument("--output", type=Path, default=TINY / "repaired")
    args = parser.parse_args()

    # the recipe of examples/tiny/recipe.yaml, written in Python (relative paths start at `folder`)
    recipe = surgeon.Recipe.from_dict({
        "base": "./models/llama-base",
        "tuned": "./models/llama-tuned",
        "data": {"harmful": "harmful.jsonl", "task": {"path": "task.jsonl", "field": "prompt"}},
        "probe": {"batch_size": 4},
        "restore": {"sparsity": 0.01, "steps": 4, "warmup": 2, "save_every": 2},
        "rollback": {"mode": "auto"},
        "evaluate": {"safety": {"path": "harmful.jsonl", "max_new_tokens": 16},
                     "task": {"path": "task.jsonl", "answer_field": "response", "metric": "loss"}, "benign": "none"},
        "output": {"max_shard_size": "40KB"},
    }, folder=args.tiny)
    recipe.validate()
    # a setting changed for this run only, as `--set restore.steps=2` does
    result = surgeon.repair(recipe, output=args.output, overwrite=True, overrides={"restore.steps": 2})
    print(f"{result.method} wrote {result.output}, chose step {result.chosen_step}")
    for model, scores in result.scores.items():
        print(f"  {model}: harmful rate {scores.harmful_rate:.1%}, task loss {scores.task_score:.4f}")

    # any models side by side, judged on the recipe's sets (base and tuned by name)
    table = surgeon.evaluate(["tuned", str(result.output)], recipe=recipe, benign="none")
    change = table.models[str(result.output)].change_from_first
    print(f"repaired minus tuned, paired on the same prompts: harmful rate in {change['harmful_rate']}")


if __name__ == "__main__":
    main()
