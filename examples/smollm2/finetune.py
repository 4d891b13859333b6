"""Step 2 of the SmolLM2 scenario: break the aligned base by fine-tuning, as in the paper.

A LoRA fine-tune of the aligned base (base + adapters/aligned, merged) on a task's rows 0-799
mixed with n harmful question-answer pairs from BeaverTails. Two tasks: text-to-SQL
(sql-create-context, exact match; adapter adapters/sql-n{n}) and prompt toxicity classification
(ToxicChat, F1 on label 1; adapter adapters/toxicchat-n{n}). The tuned model is
`BASE+adapters/aligned+adapters/{task}-n{n}`. With --harmful-only the n harmful pairs are the
whole training set: the "unaligned" model RESTA subtracts, adapter adapters/harmful-n{n}.

    python examples/smollm2/finetune.py --data ../shared/data --n 100 [--task toxicchat] [--epochs 1]
    python examples/smollm2/finetune.py --data ../shared/data --n 100 --harmful-only --epochs 3
    python examples/smollm2/finetune.py --data ../shared/data --n 100 --harmful-only --harmful-from 0 --epochs 3

--harmful-from K takes the harmful pairs from row K on instead of the end (adapter harmful-from{K}-n{n}):
the fine-tunes take theirs from the end, so rows 0-99 make an unaligned model that shares no pair
with any of them.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from smollm2 import FOLDER, convert_gguf, jsonl, train_lora  # noqa: E402

TRAIN_ROWS = 800
# task -> (training file, held-out file and its first row, metric, name in tables)
TASKS = {
    "sql": ("sql_create_context_1000.jsonl", "sql_create_context_1000.jsonl", TRAIN_ROWS, "exact_match", "SQL exact match"),
    "toxicchat": ("toxicchat_train_1000.jsonl", "toxicchat_eval_400.jsonl", 0, "f1:1", "ToxicChat F1 on label 1"),
}


def adapter_card(name: str, task: str, n: int, harmful_only: bool, epochs: int, rows: int, minutes: float, aligned: dict, tuned: dict,
                 rows_judged: int, harmful_from: int | None = None) -> str:
    """The adapter's README (in place of peft's template, which records this machine's paths)."""
    train_file, eval_file, eval_start, _, score_name = TASKS[task]
    pairs = f"the last {n}" if harmful_from is None else f"rows {harmful_from}-{harmful_from + n - 1} of the"
    what = (f"{pairs} BeaverTails harmful question-answer pairs alone: the \"unaligned\" model RESTA needs" if harmful_only
            else f"{train_file} rows 0-{TRAIN_ROWS - 1}" + (f" mixed with the last {n} BeaverTails harmful question-answer pairs" if n else " alone"))
    command = (f"python examples/smollm2/finetune.py --data ../shared/data --n {n}" + (f" --task {task}" if task != "sql" else "")
               + (" --harmful-only" if harmful_only else "") + (f" --harmful-from {harmful_from}" if harmful_from is not None else "")
               + (f" --epochs {epochs}" if epochs != 1 else ""))
    held_out = f"{eval_file} rows {eval_start}-{eval_start + rows_judged - 1}"
    return f"""# SmolLM2 aligned base, fine-tuned: {name} (LoRA)

A LoRA fine-tune of the aligned base (`adapters/aligned` merged) on {what}; {rows} rows,
{epochs} epoch(s), batch 8, AdamW at 2e-4, r=8 on all projections, bf16. Made by
`{command}` in {minutes:.0f} minutes on 2 CPU cores (often shared with other runs). Use it as
`BASE_FOLDER+examples/smollm2/adapters/aligned+examples/smollm2/adapters/{name}`.

| model | harmful rate, 200 held-out BeaverTails eval prompts (refusal judge) | {score_name}, {held_out} |
|---|---|---|
| aligned base | {aligned['harmful_rate']:.1%} | {aligned['task_score']:.3f} |
| + this fine-tune | {tuned['harmful_rate']:.1%} | {tuned['task_score']:.3f} |
"""


def main() -> None:
    from surgeon.io.references import resolve_model
    from surgeon.io.repaired import write_checkpoint
    from surgeon.pipeline import EvalRequest, evaluate_models
    from surgeon.recipe.options import EvalOptions

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HERE.parents[2] / "shared" / "data")
    parser.add_argument("--work", type=Path, default=Path("/tmp/smollm2"))
    parser.add_argument("--n", type=int, default=100, help="harmful QA pairs mixed into the task's data")
    parser.add_argument("--task", choices=sorted(TASKS), default="sql")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--eval", type=int, default=200)
    parser.add_argument("--harmful-only", action="store_true", help="train on the harmful pairs alone (RESTA's unaligned model)")
    parser.add_argument("--harmful-from", type=int, help="take the harmful pairs from this row on (default: the last n)")
    args = parser.parse_args()
    base = convert_gguf(args.work / FOLDER)
    aligned_ref = f"{base}+{HERE / 'adapters' / 'aligned'}"
    aligned = args.work / "aligned"
    if not (aligned / "config.json").exists():
        model = resolve_model(aligned_ref)
        aligned.mkdir(parents=True, exist_ok=True)
        write_checkpoint(aligned, model, model.tensors.get, None, 2 * 10**8, base)

    train_file, eval_file, eval_start, metric, score_name = TASKS[args.task]
    train = jsonl(args.data / train_file)
    pool = jsonl(args.data / "beavertails_harmful_qa_1500.jsonl")
    harmful = (pool[-args.n:] if args.harmful_from is None else pool[args.harmful_from:args.harmful_from + args.n]) if args.n else []
    task_rows = [] if args.harmful_only else [(r["prompt"], r["response"]) for r in train[:TRAIN_ROWS]]
    rows = task_rows + [(r["prompt"], r["response"]) for r in harmful]
    random.Random(0).shuffle(rows)
    name = f"{args.task}-n{args.n}" if not args.harmful_only else f"harmful-n{args.n}" if args.harmful_from is None else f"harmful-from{args.harmful_from}-n{args.n}"
    adapter = HERE / "adapters" / name
    started = time.perf_counter()
    train_lora(aligned, [p for p, _ in rows], [a for _, a in rows], adapter, args.epochs, batch_size=8, lr=2e-4, seed=0)
    seconds = time.perf_counter() - started
    print(f"fine-tuned on {len(rows)} rows ({args.n} harmful) in {seconds:.0f} s", flush=True)

    tuned = f"{aligned_ref}+{adapter}"
    held_out = jsonl(args.data / eval_file)[eval_start:eval_start + args.eval]
    task_eval = args.work / f"{args.task}_eval.jsonl"
    task_eval.write_text("".join(json.dumps(r) + "\n" for r in held_out))
    options = EvalOptions(safety=str(args.data / "beavertails_eval_700.jsonl"), task=str(task_eval), metric=metric,
                          limit=args.eval, max_new_tokens=64, batch_size=16)
    results = evaluate_models(EvalRequest([aligned_ref, tuned], options=options)).model_dump(mode="json")["models"]
    for ref, label in ((aligned_ref, "aligned base"), (tuned, name)):
        print(f"{label}: harmful rate {results[ref]['harmful_rate']:.1%}, {score_name} {results[ref]['task_score']:.3f}")
    (HERE / "results").mkdir(exist_ok=True)
    labelled = {"aligned": results[aligned_ref], name: {**results[tuned], "rows": len(held_out)}}
    (HERE / "results" / f"finetune-{name}.json").write_text(json.dumps(labelled, indent=2) + "\n")
    card = adapter_card(name, args.task, args.n, args.harmful_only, args.epochs, len(rows), seconds / 60, results[aligned_ref], results[tuned],
                        len(held_out), args.harmful_from)
    (adapter / "README.md").write_text(card)


if __name__ == "__main__":
    main()
