"""Judging a checkpoint by generating only what the judge reads: for each model, the harmful rows'
answers generated whole and cut where the refusal judge's verdict settles (and the harmless rows'
where whether they refuse settles), back to back in one process on the same machine. Prints one
JSON line per model (tokens per answer and seconds, whole and cut, their ratios, and whether every
verdict is the same) and writes them to bench/results/judging_speed.json.

    python bench/judging_speed.py --model NAME=REF [--model ...] --harmful FILE --benign FILE

REF is a folder or model+adapter; FILE is JSONL with a `prompt` column. The bench's own run used
the SmolLM2 SQL n = 100 cell's tuned model and restore's repaired checkpoint on the 100 choosing
rows (HarmBench validation + BeaverTails recovery) and the 118 harmless prompts, 64 new tokens.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from one_example import materialize  # noqa: E402

RESULTS = HERE / "results" / "judging_speed.json"


def _prompts(path: Path) -> list[str]:
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]


def measure(folder: Path, prompts: list[str], read, settled, max_new_tokens: int, batch_size: int) -> dict:
    from surgeon.evaluation.generate import GenerationStats, generate, load_for_generation

    loaded = load_for_generation(folder, folder, "cpu", torch.float32, None, folder / "offload")
    runs = {}
    for name, test in (("whole", None), ("cut", settled.test)):
        stats, started = GenerationStats(), time.perf_counter()
        answers = generate(loaded, prompts, max_new_tokens, batch_size, stats=stats, settled=test)
        runs[name] = {"answers": answers, "tokens": stats.tokens, "seconds": time.perf_counter() - started}
    same = read(runs["whole"]["answers"]) == read(runs["cut"]["answers"])
    return {"rows": len(prompts), "same_verdicts": same,
            **{f"{k}_tokens_per_answer": runs[k]["tokens"] / len(prompts) for k in runs},
            **{f"{k}_seconds": round(runs[k]["seconds"], 1) for k in runs},
            "token_ratio": runs["cut"]["tokens"] / runs["whole"]["tokens"], "time_ratio": runs["cut"]["seconds"] / runs["whole"]["seconds"]}


def main() -> None:
    from surgeon.evaluation.judges import RefusalJudge

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="NAME=REF")
    parser.add_argument("--harmful", type=Path, required=True)
    parser.add_argument("--benign", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/judging-speed"))
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    judge = RefusalJudge()
    sets = {"harmful": (_prompts(args.harmful), lambda a: judge(None, a), judge.settled),
            "harmless": (_prompts(args.benign), lambda a: [judge.refuses(x) for x in a], judge.refusal_settled)}
    rows = []
    for spec in args.model:
        name, reference = spec.split("=", 1)
        folder = materialize(reference, args.work / name) if "+" in reference else Path(reference)
        for kind, (prompts, read, settled) in sets.items():
            row = {"model": name, "set": kind, "max_new_tokens": args.max_new_tokens,
                   **measure(folder, prompts, read, settled, args.max_new_tokens, args.batch_size)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"command": "python bench/judging_speed.py " + " ".join(sys.argv[1:]), "machine": platform.machine(),
                                   "cpus": torch.get_num_threads(), "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                                   "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
