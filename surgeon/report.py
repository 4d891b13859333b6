"""surgeon.json: everything needed to audit and reproduce a run."""

from __future__ import annotations

import functools
import json
import resource
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

from surgeon import DISTRIBUTION, __version__


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


def build_report(
    *, method: str, recipe_sha256: str, inputs: dict, settings: dict, change: str, changed: dict, record: dict,
    decoder_parameters: int, timer: PhaseTimer, extra: dict,
) -> dict:
    """surgeon.json: the same frame for every method, with the method's own sections (`record`)."""
    return {
        "tool": tool_identity(),
        "recipe_sha256": recipe_sha256,
        "method": method,
        "inputs": inputs,
        "settings": settings,
        "decoder_parameters_N": decoder_parameters,
        "change": change,
        "changed": changed,
        **record,
        "seconds": {k: round(v, 3) for k, v in timer.seconds.items()},
        "peak_memory": peak_memory(),
        **extra,
    }


def write_report(path: Path, report: dict) -> None:
    path.write_text(json.dumps(report, indent=2) + "\n")


def _number(value, percent: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:.1%}" if percent else f"{value:.4f}"


INTERVALS = "In brackets: 95% intervals (Wilson's for a harmful or over-refusal rate; a bootstrap over the rows for a task score)."


def bracketed(rows: list[tuple[str, ...]]) -> bool:
    """Whether any rate or task score of `model_rows` shows an interval."""
    return any("[" in cell for row in rows for cell in row[1:6])


def _scored(value, interval, percent: bool = False) -> str:
    """A score and its 95% interval where one was measured."""
    shown = _number(value, percent)
    return f"{shown} [{_number(interval[0], percent)}, {_number(interval[1], percent)}]" if interval and value is not None else shown


HARM_NOT_MEASURED = "harm not measured (evaluate.safety: none): nothing here shows the repair is safer than tuned"
HARM_NOT_MEASURED_NOTE = f"**{HARM_NOT_MEASURED.capitalize()}.**"  # the first words of report.md and the card


def harm_measured(report: dict) -> bool:
    return bool((report.get("evaluation") or {}).get("judge"))


def safety_rows_text(evaluation: dict) -> str:
    """What the reported harmful prompts are: held out only when none of them also probed the
    repair or chose its checkpoint (compared by content)."""
    shared = evaluation.get("safety_shared") or {}
    count = evaluation["safety_prompts"]
    notes = [f"{n} of them {what}" for n, what in ((shared.get("probe"), "also probed the repair"),
                                                   (shared.get("choosing"), "also chose the checkpoint")) if n]
    return f"{count} held-out harmful prompts" if not notes else f"{count} harmful prompts, not held out ({'; '.join(notes)})"


def answer_lines(examples: dict) -> list[str]:
    """Each shown prompt with every model's answer side by side (markdown), harmful ones marked."""
    verdict = lambda row: "" if "verdict" not in row else " — **complied**" if row["verdict"] == "complied" else f" — {row['verdict'] or 'unparsable'}"
    quote = lambda text: " ".join(text.split()) or "(empty)"
    lines = []
    models = list(examples)
    for kind, title in (("safety", "Harmful prompt"), ("task", "Task prompt")):
        for i, row in enumerate(examples[models[0]].get(kind, [])):
            lines += [f"**{title} {i + 1}:** {quote(row['prompt'])}", ""]
            lines += [f"- *{m}*: {quote(examples[m][kind][i]['answer'])}{verdict(examples[m][kind][i])}" for m in models]
            lines += [f"- *reference*: {quote(row['reference'])}"] if "reference" in row else []
            lines.append("")
    return lines


def model_rows(report: dict) -> list[tuple[str, str, str, str, str, str, str, str]]:
    """(model, harmful rate, degenerate share, over-refusal, KL from tuned on the harmless prompts,
    task score, restored weights, seconds) for each evaluated model; a score's 95% interval follows
    it in brackets."""
    evaluation = report.get("evaluation") or {}
    rows = []
    for name, scores in evaluation.get("models", {}).items():
        restored = scores.get("restored", 0 if name == "tuned" else None)
        unparsable = f" ({scores['unparsable']} unparsable)" if scores.get("unparsable") else ""
        rows.append((
            name, _scored(scores["harmful_rate"], scores.get("harmful_interval"), percent=True) + unparsable,
            _number(scores.get("degenerate"), percent=True),
            _scored(scores.get("over_refusal"), scores.get("over_refusal_interval"), percent=True),
            _number(scores.get("kl_from_tuned")),
            _scored(scores["task_score"], scores.get("task_interval")),
            "–" if restored is None else f"{restored:,}", f"{scores['seconds']:.1f}",
        ))
    return rows


def category_rows(report: dict) -> tuple[list[str], list[tuple[str, ...]]]:
    """(models, one row per harm category: its name and each model's harmful rate), when the
    safety set names categories; ([], []) otherwise."""
    models = {name: scores["harmful_by_category"] for name, scores in (report.get("evaluation") or {}).get("models", {}).items()
              if scores.get("harmful_by_category")}
    categories = list(dict.fromkeys(c for rates in models.values() for c in rates))
    return list(models), [(c, *(_number(rates.get(c), percent=True) for rates in models.values())) for c in categories]


def category_lines(report: dict) -> list[str]:
    """Markdown: the harmful rate per harm category and model (nothing without categories)."""
    models, rows = category_rows(report)
    if not rows:
        return []
    return [f"| category | {' | '.join(models)} |", "|---|" + "---|" * len(models)] + [f"| {' | '.join(row)} |" for row in rows]


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
            "patience": "stopped when restore.stop_at.patience checkpoints in a row lowered the harmful rate no further",
            "floor": "stopped when the task score went past the floor"}


def tradeoff_lines(report: dict) -> list[str]:
    """Markdown: why the schedule ended (for a method that records it), and the table of checkpoints."""
    task, settings = report["task"], report["settings"]
    why = []
    if task.get("stopped") in _STOPPED:
        why.append(f"The schedule {_STOPPED[task['stopped']].format(steps=settings.get('steps'))}")
    if settings.get("select"):
        why.append(f"the checkpoint was chosen by `{settings['select']}`")
    lines = ["; ".join(why) + "." + _rows_sentence(report) if why else _rows_sentence(report).strip(), "",
             "| model | restored (share of N) | harmful rate | task score | within floor | |", "|---|---|---|---|---|---|"]
    return lines + [f"| {' | '.join(row)} |" for row in checkpoint_rows(report)]


def render_markdown(report: dict) -> str:
    """report.md: what a person reads first in the output folder."""
    evaluation = report.get("evaluation") or {}
    lines = [
        "# surgeon repair report",
        "",
        *([] if harm_measured(report) else [HARM_NOT_MEASURED_NOTE, ""]),
        f"surgeon {report['tool']['version']}, method {report['method']}; base `{report['inputs']['base']['reference']}`, "
        f"tuned `{report['inputs']['tuned']['reference']}`.",
        report["change"] + ".",
        "",
    ]
    if evaluation.get("models"):
        rows = model_rows(report)
        metric = evaluation["metric"] or "–"
        direction = "" if evaluation["higher_is_better"] is None else (" (higher is better)" if evaluation["higher_is_better"] else " (lower is better)")
        lines += [
            f"## Models (judge: {evaluation['judge'] or '–'} on {safety_rows_text(evaluation)}; over-refusal on "
            f"{evaluation.get('benign_prompts') or 0} harmless prompts; task: {metric}{direction} on {evaluation['task_rows']} rows)",
            "",
            "| model | harmful rate | degenerate | over-refusal | KL from tuned | task score | restored weights | seconds |",
            "|---|---|---|---|---|---|---|---|",
            *[f"| {' | '.join(row)} |" for row in rows],
            "",
            *([INTERVALS, ""] if bracketed(rows) else []),
        ]
    if category_lines(report):
        lines += ["## Harmful rate per category", "", *category_lines(report), ""]
    if evaluation.get("examples"):
        lines += ["## Answers", "", *answer_lines(evaluation["examples"]), ""]
    task = report.get("task") or {}
    if task.get("checkpoints"):
        lines += ["## Checkpoints", "", *tradeoff_lines(report), ""]
    if not report.get("steps"):
        return "\n".join(lines) + "\n"
    lines += ["## Steps", "", "| step | phase | restored | reverted | restored so far | harmful rate | task score | |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in step_rows(report)]
    if task["floor"] is not None:
        lines += ["", f"Task floor {task['floor']:.4f} (tuned {task['tuned']:.4f}); rollback {'used' if task['rollback_used'] else 'not used'}."]
    return "\n".join(lines) + "\n"
