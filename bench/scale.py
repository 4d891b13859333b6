"""One restore step on random Llama-shaped pairs: wall time, peak RSS, the gradient pass's share of
this machine's measured fp32 matmul throughput, and the ratio to a plain in-memory implementation.

Pairs (written once, tensor by tensor, under --work): 0.37B fp32, 1.1B bf16 and 3.0B bf16, each run
with the default memory budget and with `compute.max_memory` set small. One restore-only step on 16
prompts, fp32 arithmetic, no evaluation. The in-memory run (tests/reference.py: whole models in
RAM, the model's own forward through the first E layers, autograd, one top-k: bench/in_memory_step.py)
does the same step where it fits in memory.
Runs go one after another (never two at once), each with the pair's files read into the page
cache first; each configuration runs --repeats times (the in-memory run alternating with surgeon's), and the row gives the median wall and step time, every
run's step time, and the largest peak RSS: on this 2-core VM one run's step time varies by +-10-20%.
The matmul ceiling (a 2048^3 fp32 product) is measured just before and just after every run, and
each run's share is its arithmetic over its step time over the mean of the two: the VMs this runs on
differ by 2x in their matmul rate from one day to the next, so a ceiling measured on another day is
not a ratio, and within minutes by up to a third, so one measurement 10 s before the step is a noisy
one (`matmul_flops_around` keeps each run's pair).
Results are kept in bench/results/scale.json and a configuration measured before is skipped unless
--again.

    python bench/scale.py [--pairs 0.37b:float32 1.1b:bfloat16 3b:bfloat16] [--budgets default 256MiB]
                          [--in-memory 0.37b:float32] [--repeats 3] [--work /tmp/surgeon-scale] [--again]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from gpu_check import gradient_pass_work, matmul_flops, write_pair  # noqa: E402
import pages  # noqa: E402
from timed_run import surgeon_run, timed  # noqa: E402

from surgeon.tiny import HARMFUL, TASK  # noqa: E402

RESULTS = HERE / "results" / "scale.json"
SUMMARY = ("wall_seconds", "peak_rss_gib", "step_seconds", "steps_seconds", "matmul_flops", "matmul_flops_around", "matmul_share", "wall_ratio")
PROMPTS = (HARMFUL * 2)[:16]
SPARSITY = 0.002


def recipe(base: Path, tuned: Path, out: Path, budget: str) -> dict:
    compute = {"device": "cpu", "dtype": "float32", **({} if budget == "default" else {"max_memory": budget})}
    return {"base": str(base), "tuned": str(tuned), "data": {"harmful": {"prompts": PROMPTS}, "task": {"prompts": TASK}},
            "probe": {"batch_size": 8}, "restore": {"sparsity": SPARSITY, "steps": 1, "warmup": 0, "save_every": 1, "rollback": {"mode": "never"}},
            "evaluate": {"models": []}, "compute": compute,
            "output": {"path": str(out), "max_shard_size": "2GB"}}


def warm(*folders: Path) -> None:
    """Read the pair's files once, so that every run starts with them in the page cache: the step
    then measures the arithmetic, not what an earlier run (the in-memory one holds 8 GiB, or a
    larger pair) left of the cache on this VM's disk (a cold first read took a 0.37B step from
    2.6 to 4.6 s)."""
    for folder in folders:
        for file in sorted(folder.glob("*.safetensors")):
            with open(file, "rb") as stream:
                while stream.read(64 * 2**20):
                    pass


def ceiling() -> float:
    return matmul_flops("cpu", torch.float32, 2048)


def in_memory(base: Path, tuned: Path, probe_layer: int) -> dict:
    """The same step done the plain way (bench/in_memory_step.py), under /usr/bin/time."""
    out = tuned.parent / f"in-memory-{tuned.name}"
    run = timed([sys.executable, str(HERE / "in_memory_step.py"), str(base), str(tuned), str(out),
                 "--layer", str(probe_layer), "--sparsity", str(SPARSITY), "--prompts", *PROMPTS], "in-memory step")
    return {"wall_seconds": run.wall_seconds, "peak_rss_gib": run.peak_rss_gib, "step_seconds": float(re.search(r"step ([\d.]+) s", run.stdout)[1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", default=["0.37b:float32", "1.1b:bfloat16", "3b:bfloat16"])
    parser.add_argument("--budgets", nargs="+", default=["default", "256MiB"])
    parser.add_argument("--in-memory", nargs="*", default=["0.37b:float32"], help="pairs also run by the in-memory implementation")
    parser.add_argument("--work", type=Path, default=Path("/tmp/surgeon-scale"))
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration (median times, largest peak)")
    parser.add_argument("--again", action="store_true", help="measure configurations already in the results again")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    RESULTS.parent.mkdir(exist_ok=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for pair in args.pairs:
        shape, dtype = pair.split(":")
        base, tuned = write_pair(args.work, shape, getattr(torch, dtype))
        checkpoint_bytes = sum(f.stat().st_size for f in tuned.glob("*.safetensors"))
        for budget in args.budgets:
            key = f"{pair} {budget}"
            if key in results.get("runs", {}) and not args.again:
                continue
            out = args.work / f"out-{shape}-{dtype}-{budget}"
            path = args.work / f"{shape}-{dtype}-{budget}.yaml"
            path.write_text(yaml.safe_dump(recipe(base, tuned, out, budget)))
            runs, reports, plain, around = [], [], [], []
            for _ in range(args.repeats):
                warm(base, tuned)
                before = ceiling()
                runs.append(surgeon_run(path, "--fresh"))  # a saved state would be resumed, not measured
                reports.append(json.loads((out / "surgeon.json").read_text()))
                around.append((before, ceiling()))
                if pair in args.in_memory and budget == args.budgets[0]:  # alternating with surgeon's: back to back
                    warm(base, tuned)
                    measured = in_memory(base, tuned, reports[-1]["settings"]["probe_layer"])
                    plain.append({**measured, "matmul_flops_around": (around[-1][1], ceiling())})
            ceilings = [statistics.mean(probes) for probes in around]
            steps = [report["record"]["steps"][0]["seconds"] for report in reports]
            step = statistics.median(steps)
            report = reports[steps.index(min(steps, key=lambda s: abs(s - step)))]
            tokens, flops = gradient_pass_work(report, PROMPTS)
            row = {"checkpoint_bytes": checkpoint_bytes, "repeats": args.repeats, "wall_seconds": statistics.median(r.wall_seconds for r in runs),
                   "peak_rss_gib": max(r.peak_rss_gib for r in runs), "step_seconds": step, "steps_seconds": steps,
                   "matmul_flops": ceilings, "matmul_flops_around": around, "matmul_share": statistics.median(flops / s / c for s, c in zip(steps, ceilings)),
                   "probe_layer": report["settings"]["probe_layer"],
                   "memory": report["memory"], "phases": report["seconds"]}
            if plain:
                plain_step = statistics.median(r["step_seconds"] for r in plain)
                # its work: every layer's forward and backward once (autograd keeps the whole graph)
                _, plain_flops = gradient_pass_work(report, PROMPTS, recompute=False)
                row["in_memory"] = {"wall_seconds": statistics.median(r["wall_seconds"] for r in plain), "peak_rss_gib": max(r["peak_rss_gib"] for r in plain),
                                    "step_seconds": plain_step, "steps_seconds": [r["step_seconds"] for r in plain],
                                    "matmul_share": statistics.median(plain_flops / r["step_seconds"] / statistics.mean(r["matmul_flops_around"]) for r in plain)}
                row["wall_ratio"] = row["wall_seconds"] / row["in_memory"]["wall_seconds"]
            earlier = results.get("runs", {}).get(key)
            if earlier:  # a set measured again keeps the earlier sets' figures beside it
                # (sets measured before the ceiling was taken per run share the file's one ceiling)
                earlier.setdefault("matmul_flops", results.get("matmul_flops"))
                row["earlier"] = earlier.pop("earlier", []) + [{k: earlier[k] for k in SUMMARY if k in earlier}]
            results.setdefault("runs", {})[key] = row
            RESULTS.write_text(json.dumps(results, indent=2) + "\n")
            pages.write()
            ratio = f", {row['wall_ratio']:.2f}x the in-memory wall ({row['in_memory']['wall_seconds']:.0f} s, "\
                    f"{row['in_memory']['peak_rss_gib']:.2f} GiB; its step {row['in_memory']['step_seconds']:.1f} s, "\
                    f"{row['in_memory']['matmul_share']:.1%} of the matmul)" if "wall_ratio" in row else ""
            print(f"{key}: {row['wall_seconds']:.1f} s wall, peak RSS {row['peak_rss_gib']:.2f} GiB "
                  f"({row['peak_rss_gib'] * 2**30 / checkpoint_bytes:.0%} of one checkpoint), step {step:.1f} s ({', '.join(f'{s:.1f}' for s in steps)}), "
                  f"{row['matmul_share']:.1%} of the matmul measured around each run ({', '.join(f'{a / 1e9:.0f}/{b / 1e9:.0f}' for a, b in around)} GFLOP/s before/after){ratio}", flush=True)


if __name__ == "__main__":
    main()
