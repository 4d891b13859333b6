"""surgeon.json: everything needed to audit and reproduce a run."""

from __future__ import annotations

import functools
import json
import re
import resource
import subprocess
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from surgeon import DISTRIBUTION, __version__
from surgeon.engine.masks import MaskSet
from surgeon.methods.restore import RepairResult


@functools.cache  # constant for the process; git runs once
def tool_identity() -> dict:
    """Which surgeon made the output: the release, or the git commit when it ran from a checkout
    (a version number alone would not say which code that was)."""
    identity = {"name": "surgeon", "distribution": DISTRIBUTION, "version": __version__}
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / ".git").exists():
        try:
            git = ["git", "-C", str(checkout)]
            commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True).stdout.strip()
            changes = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10, check=True)
            identity.update(commit=commit, modified=bool(changes.stdout.strip()))
        except (OSError, subprocess.SubprocessError):
            pass
    return identity


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
        "tool": tool_identity(),
        "recipe_sha256": recipe_sha256,
        "inputs": inputs,
        "settings": settings,
        "decoder_parameters_N": decoder_parameters,
        "restored": {"total": restored, "share_of_N": restored / decoder_parameters, **restored_breakdown(masks)},
        "steps": [asdict(step) for step in result.steps],
        "task": {
            "tuned": result.tuned_score,
            "tuned_harmful_rate": result.tuned_harm,
            "floor": result.floor,
            "warmup": result.warmup_score,
            "rollback_used": result.rollback_used,
            "checkpoints": [
                {"step": c.step, "restored": c.restored, "share_of_N": c.restored / decoder_parameters, "score": c.score,
                 "harmful_rate": c.harmful_rate, "meets_floor": c.meets_floor, "chosen": c is result.chosen}
                for c in result.checkpoints
            ],
            "chosen_step": result.chosen.step if result.chosen else None,
            "stopped": result.stopped,
        },
        "seconds": {k: round(v, 3) for k, v in timer.seconds.items()},
        "peak_memory": peak_memory(),
        **extra,
    }


def baseline_report(*, recipe_sha256: str, inputs: dict, settings: dict, changed: dict, evaluation: dict | None,
                    timer: PhaseTimer, output: dict) -> dict:
    """surgeon.json of a baseline method (reset_layers, resta): what changed and the evaluation."""
    return {
        "tool": tool_identity(),
        "recipe_sha256": recipe_sha256,
        "method": settings["method"],
        "inputs": inputs,
        "settings": settings,
        "changed": changed,
        "evaluation": evaluation,
        "seconds": {k: round(v, 3) for k, v in timer.seconds.items()},
        "peak_memory": peak_memory(),
        "output": output,
    }


def describe_change(report: dict) -> str:
    """One sentence on what the method changed in tuned."""
    settings = report["settings"]
    if "steps" in report:
        restored = report["restored"]
        return (f"{restored['total']:,} weights ({restored['share_of_N']:.4%} of the decoder parameters) restored from base, "
                f"chosen by gradient in decoder layers below {settings['probe_layer']} of {settings['layers_L']}")
    changed = report["changed"]
    if report["method"] == "reset_layers":
        return f"decoder layers below {settings['probe_layer']} of {settings['layers_L']} copied whole from base ({changed['parameters']:,} parameters)"
    return (f"RESTA: tuned + {settings['scale']} x (base - unaligned) on {changed['tensors']} tensors "
            f"({changed['parameters']:,} parameters)")


def write_report(path: Path, report: dict) -> None:
    path.write_text(json.dumps(report, indent=2) + "\n")


def _number(value, percent: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:.1%}" if percent else f"{value:.4f}"


def model_rows(report: dict) -> list[tuple[str, str, str, str, str]]:
    """(model, harmful rate, task score, restored weights, seconds) for each evaluated model."""
    evaluation = report.get("evaluation") or {}
    rows = []
    for name, scores in evaluation.get("models", {}).items():
        restored = scores.get("restored", 0 if name == "tuned" else None)
        unparsable = f" ({scores['unparsable']} unparsable)" if scores.get("unparsable") else ""
        rows.append((
            name, _number(scores["harmful_rate"], percent=True) + unparsable, _number(scores["task_score"]),
            "–" if restored is None else f"{restored:,}", f"{scores['seconds']:.1f}",
        ))
    return rows


def step_rows(report: dict) -> list[tuple[str, ...]]:
    """(step, phase, restored, reverted, restored so far, harmful rate, task score, mark) per step.
    Checkpoints belong to the last phase run; after a rollback restart, the discarded warm-up
    shows only its own gate score, on its last step."""
    task = report["task"]
    steps = report["steps"]
    final_phase = steps[-1]["phase"] if steps else None
    checkpoints = {c["step"]: c for c in task["checkpoints"]}
    rows = []
    for index, step in enumerate(steps):
        if step["phase"] == final_phase:
            c = checkpoints.get(step["step"], {})
            mark = "chosen" if task["chosen_step"] == step["step"] else ("past floor" if c and not c["meets_floor"] else "")
        else:
            last_of_warmup = steps[index + 1]["phase"] == final_phase
            c = {"score": task["warmup"]} if last_of_warmup else {}
            mark = "past floor: discarded, restarted with rollback" if last_of_warmup else ""
        rows.append((str(step["step"]), step["phase"], f"{step['restored']:,}", f"{step['reverted']:,}", f"{step['total_restored']:,}",
                     _number(c.get("harmful_rate"), percent=True), _number(c.get("score")), mark))
    return rows


def chosen_on_reported_rows(report: dict) -> bool:
    """Whether the checkpoints were scored on the rows the models table reports (base and the
    checkpoints then sit on one scale)."""
    return not any("select_on" in rows for rows in ((report.get("evaluation") or {}).get("chosen_on") or {}).values())


def _rows_sentence(report: dict) -> str:
    evaluation = report.get("evaluation") or {}
    chosen_on = evaluation.get("chosen_on") or {}
    if not chosen_on:
        return ""
    if evaluation["held_out"]:
        return (f" Checkpoints were scored on {' and '.join(f'`{r}`' for r in chosen_on.values())}; the models table reports "
                "`evaluate`'s own rows, which chose nothing.")
    reused = [f"`evaluate.{name}`" for name, rows in chosen_on.items() if "select_on" not in rows]
    return (f" The rows of {' and '.join(reused)} both chose the checkpoint and are reported in the models table, so those "
            "figures are not held out (`evaluate.select_on` gives rows that only choose).")


def checkpoint_rows(report: dict) -> list[tuple[str, ...]]:
    """The trade-off: (model, share restored, harmful rate, task score, within the floor, chosen)
    for tuned, each checkpoint of the final schedule, and base when it was evaluated on the same rows."""
    task = report["task"]
    rows = [("tuned", "0", _number(task["tuned_harmful_rate"], percent=True), _number(task["tuned"]), "", "")]
    for c in task["checkpoints"]:
        rows.append((f"step {c['step']}", f"{c['share_of_N']:.3%}", _number(c["harmful_rate"], percent=True), _number(c["score"]),
                     "yes" if c["meets_floor"] else "no", "chosen" if c["chosen"] else ""))
    base = ((report.get("evaluation") or {}).get("models") or {}).get("base")
    if base and chosen_on_reported_rows(report):
        rows.append(("base", "–", _number(base["harmful_rate"], percent=True), _number(base["task_score"]), "", ""))
    return rows


_STOPPED = {"steps": "ran all {steps} steps (restore.steps)", "stop_at": "stopped when the harmful rate reached restore.stop_at",
            "floor": "stopped when the task score went past the floor"}


def tradeoff_lines(report: dict) -> list[str]:
    """Markdown: why the schedule ended, and the table of checkpoints."""
    task = report["task"]
    lines = [f"The schedule {_STOPPED[task['stopped']].format(steps=report['settings']['steps'])}; "
             f"the checkpoint was chosen by `{report['settings']['select']}`." + _rows_sentence(report), "",
             "| model | restored (share of N) | harmful rate | task score | within floor | |", "|---|---|---|---|---|---|"]
    return lines + [f"| {' | '.join(row)} |" for row in checkpoint_rows(report)]


def render_markdown(report: dict) -> str:
    """report.md: what a person reads first in the output folder."""
    evaluation = report.get("evaluation") or {}
    lines = [
        "# surgeon repair report",
        "",
        f"surgeon {report['tool']['version']}, method {report.get('method', 'restore')}; base `{report['inputs']['base']['reference']}`, "
        f"tuned `{report['inputs']['tuned']['reference']}`.",
        describe_change(report) + ".",
        "",
    ]
    if evaluation.get("models"):
        metric = evaluation["metric"] or "–"
        direction = "" if evaluation["higher_is_better"] is None else (" (higher is better)" if evaluation["higher_is_better"] else " (lower is better)")
        lines += [
            f"## Models (judge: {evaluation['judge'] or '–'} on {evaluation['safety_prompts']} prompts; task: {metric}{direction} on {evaluation['task_rows']} rows)",
            "",
            "| model | harmful rate | task score | restored weights | seconds |",
            "|---|---|---|---|---|",
            *[f"| {' | '.join(row)} |" for row in model_rows(report)],
            "",
        ]
    if "steps" not in report:
        return "\n".join(lines) + "\n"
    task = report["task"]
    if task["checkpoints"]:
        lines += ["## Checkpoints", "", *tradeoff_lines(report), ""]
    lines += ["## Steps", "", "| step | phase | restored | reverted | restored so far | harmful rate | task score | |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in step_rows(report)]
    if task["floor"] is not None:
        lines += ["", f"Task floor {task['floor']:.4f} (tuned {task['tuned']:.4f}); rollback {'used' if task['rollback_used'] else 'not used'}."]
    return "\n".join(lines) + "\n"
