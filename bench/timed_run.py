"""Run `surgeon run RECIPE` under /usr/bin/time -v: wall time and peak RSS as the OS reports them."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class TimedRun:
    stdout: str
    wall: str
    wall_seconds: float
    peak_rss_gib: float


def _seconds(wall: str) -> float:
    """'h:mm:ss' or 'm:ss.ss' as printed by GNU time."""
    seconds = 0.0
    for part in wall.split(":"):
        seconds = seconds * 60 + float(part)
    return seconds


def timed(command: list[str], what: str) -> TimedRun:
    """Run `command` under /usr/bin/time -v; exit with its stderr's tail if it fails."""
    result = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{what} failed:\n{result.stderr[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time.*: (.+)", result.stderr)[1].strip()
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)[1])
    return TimedRun(result.stdout.strip(), wall, _seconds(wall), rss_kb / 2**20)


def surgeon_run(recipe: Path, *extra: str, processes: int = 1) -> TimedRun:
    """One `surgeon run`; with processes > 1, data-parallel under torchrun (peak RSS: the largest process's)."""
    launcher = ["-m", "torch.distributed.run", f"--nproc-per-node={processes}"] if processes > 1 else []
    return timed([sys.executable, *launcher, "-m", "surgeon.cli", "run", str(recipe), "--overwrite", "-q", *extra], f"surgeon run {recipe}")
