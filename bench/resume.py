"""Resume after a kill: an uninterrupted run, then the same recipe killed (SIGKILL) at a share of
that run's time and run again.

    python bench/resume.py [--recipe examples/smollm2/recipe.yaml] [--at 0.7] [--work /tmp/resume-bench]

Prints both wall times and their ratio, the step the rerun resumed after, and whether the weights,
masks and recipe copy match the uninterrupted run's byte for byte. Both runs read the same
evaluation cache (answers judged once are not generated again), so the ratio is the repair's own.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from timed_run import surgeon_run

HERE = Path(__file__).resolve().parent


def written(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name.startswith("model") or p.name in ("masks.safetensors", "recipe.yaml")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=HERE.parent / "examples" / "smollm2" / "recipe.yaml")
    parser.add_argument("--at", type=float, default=0.7, help="kill at this share of the uninterrupted run's wall time")
    parser.add_argument("--work", type=Path, default=Path("/tmp/resume-bench"))
    args = parser.parse_args()
    whole, resumed = args.work / "whole", args.work / "resumed"

    uninterrupted = surgeon_run(args.recipe, "--output", str(whole), "--fresh")
    print(f"uninterrupted: {uninterrupted.wall_seconds:.1f} s")

    command = [sys.executable, "-m", "surgeon.cli", "run", str(args.recipe), "--output", str(resumed), "--overwrite", "--fresh", "-q"]
    killed = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(args.at * uninterrupted.wall_seconds)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    saved = resumed.parent / f".{resumed.name}.surgeon-state" / "progress.json"
    step = json.loads(saved.read_text())["step"] if saved.exists() else None
    print(f"killed at {args.at:.0%} of that time ({args.at * uninterrupted.wall_seconds:.1f} s); saved state after step {step}")

    rerun = surgeon_run(args.recipe, "--output", str(resumed))
    same = written(resumed) == written(whole)
    print(f"rerun: {rerun.wall_seconds:.1f} s = {rerun.wall_seconds / uninterrupted.wall_seconds:.0%} of the uninterrupted run; "
          f"weights, masks and recipe {'identical' if same else 'DIFFERENT'}; peak RSS {rerun.peak_rss_gib:.2f} GiB")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
