"""surgeon.json: everything needed to audit and reproduce a run."""

from __future__ import annotations

import json
import re
import resource
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from surgeon import __version__
from surgeon.engine.masks import MaskSet
from surgeon.methods.restore import RepairResult


class PhaseTimer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started


def peak_memory() -> dict:
    peak = {"rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["cuda_bytes"] = torch.cuda.max_memory_allocated()
    return peak


_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+?)(?:\.weight|\.bias)?$")


def restored_breakdown(masks: MaskSet) -> dict:
    by_layer, by_module = Counter(), Counter()
    for name in masks.names():
        count = masks.count(name)
        match = _LAYER.match(name)
        by_layer[int(match[1])] += count
        by_module[match[2]] += count
    return {"by_layer": dict(sorted(by_layer.items())), "by_module": dict(sorted(by_module.items()))}


def build_report(
    *, recipe_sha256: str, inputs: dict, settings: dict, result: RepairResult, masks: MaskSet,
    decoder_parameters: int, timer: PhaseTimer, extra: dict,
) -> dict:
    restored = masks.count()
    return {
        "tool": {"name": "surgeon", "version": __version__},
        "recipe_sha256": recipe_sha256,
        "inputs": inputs,
        "settings": settings,
        "decoder_parameters_N": decoder_parameters,
        "restored": {"total": restored, "share_of_N": restored / decoder_parameters, **restored_breakdown(masks)},
        "steps": [asdict(step) for step in result.steps],
        "task": {
            "tuned": result.tuned_score,
            "floor": result.floor,
            "warmup": result.warmup_score,
            "rollback_used": result.rollback_used,
            "checkpoints": [{"step": c.step, "restored": c.restored, "score": c.score, "meets_floor": c.meets_floor} for c in result.checkpoints],
            "chosen_step": result.chosen.step if result.chosen else None,
        },
        "seconds": {k: round(v, 3) for k, v in timer.seconds.items()},
        "peak_memory": peak_memory(),
        **extra,
    }


def write_report(path: Path, report: dict) -> None:
    path.write_text(json.dumps(report, indent=2) + "\n")
