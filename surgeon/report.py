"""surgeon.json: everything needed to audit and reproduce a run."""

from __future__ import annotations

import functools
import resource
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

from surgeon import DISTRIBUTION, __version__
from surgeon.records import Evaluation, MethodRecord, RunRecord, Tradeoff


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


def build_record(
    *, method: str, recipe_sha256: str, inputs: dict, settings: dict, change: str, changed: dict, tradeoff: Tradeoff | None,
    record: MethodRecord | None, evaluation: Evaluation | None,
    decoder_parameters: int, timer: PhaseTimer, memory: dict, output: dict,
) -> RunRecord:
    """surgeon.json: the same frame for every method, with the method's trade-off and own record."""
    return RunRecord(
        tool=tool_identity(), recipe_sha256=recipe_sha256, method=method, inputs=inputs, settings=settings,
        decoder_parameters_N=decoder_parameters, change=change, changed=changed, tradeoff=tradeoff, record=record,
        evaluation=evaluation, seconds={k: round(v, 3) for k, v in timer.seconds.items()}, peak_memory=peak_memory(), memory=memory,
        output=output,
    )


def number(value, percent: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:.1%}" if percent else f"{value:.4f}"


INTERVALS = "In brackets: 95% intervals (Wilson's for a harmful or over-refusal rate; a bootstrap over the rows for a task score)."


def bracketed(rows: list[tuple[str, ...]]) -> bool:
    """Whether any rate or task score of `model_rows` shows an interval."""
    return any("[" in cell for row in rows for cell in row[1:6])


def _scored(value, interval, percent: bool = False) -> str:
    """A score and its 95% interval where one was measured."""
    shown = number(value, percent)
    return f"{shown} [{number(interval[0], percent)}, {number(interval[1], percent)}]" if interval and value is not None else shown


HARM_NOT_MEASURED = "harm not measured (evaluate.safety: none): nothing here shows the repair is safer than tuned"
HARM_NOT_MEASURED_NOTE = f"**{HARM_NOT_MEASURED.capitalize()}.**"  # the first words of report.md and the card


def safety_rows_text(evaluation: Evaluation) -> str:
    """What the reported harmful prompts are: held out only when none of them also probed the
    repair or chose its checkpoint (compared by content)."""
    shared = evaluation.safety_shared
    notes = [f"{n} of them {what}" for n, what in ((shared.get("probe"), "also probed the repair"),
                                                   (shared.get("choosing"), "also chose the checkpoint")) if n]
    count = evaluation.safety_prompts
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


def model_rows(evaluation: Evaluation | None) -> list[tuple[str, str, str, str, str, str, str, str]]:
    """(model, harmful rate, degenerate share, over-refusal, KL from tuned on the harmless prompts,
    task score, restored weights, seconds) for each evaluated model; a score's 95% interval follows
    it in brackets."""
    rows = []
    for name, scores in (evaluation.models if evaluation else {}).items():
        restored = 0 if name == "tuned" and scores.restored is None else scores.restored
        unparsable = f" ({scores.unparsable} unparsable)" if scores.unparsable else ""
        rows.append((
            name, _scored(scores.harmful_rate, scores.harmful_interval, percent=True) + unparsable,
            number(scores.degenerate, percent=True),
            _scored(scores.over_refusal, scores.over_refusal_interval, percent=True),
            number(scores.kl_from_tuned),
            _scored(scores.task_score, scores.task_interval),
            "–" if restored is None else f"{restored:,}", f"{scores.seconds:.1f}",
        ))
    return rows


def category_rows(evaluation: Evaluation | None) -> tuple[list[str], list[tuple[str, ...]]]:
    """(models, one row per harm category: its name and each model's harmful rate), when the
    safety set names categories; ([], []) otherwise."""
    models = {name: scores.harmful_by_category for name, scores in (evaluation.models if evaluation else {}).items()
              if scores.harmful_by_category}
    categories = list(dict.fromkeys(c for rates in models.values() for c in rates))
    return list(models), [(c, *(number(rates.get(c), percent=True) for rates in models.values())) for c in categories]


def category_lines(evaluation: Evaluation | None) -> list[str]:
    """Markdown: the harmful rate per harm category and model (nothing without categories)."""
    models, rows = category_rows(evaluation)
    if not rows:
        return []
    return [f"| category | {' | '.join(models)} |", "|---|" + "---|" * len(models)] + [f"| {' | '.join(row)} |" for row in rows]


def chosen_on_reported_rows(evaluation: Evaluation | None) -> bool:
    """Whether the checkpoints were scored on the rows the models table reports (base and the
    checkpoints then sit on one scale)."""
    return not any("select_on" in rows for rows in ((evaluation.chosen_on if evaluation else None) or {}).values())


def _rows_sentence(evaluation: Evaluation | None) -> str:
    chosen_on = (evaluation.chosen_on if evaluation else None) or {}
    if not chosen_on:
        return ""
    if evaluation.held_out:
        return (f" Checkpoints were scored on {' and '.join(f'`{r}`' for r in chosen_on.values())}; the models table reports "
                "`evaluate`'s own rows, which chose nothing.")
    reused = [f"`evaluate.{name}`" for name, rows in chosen_on.items() if "select_on" not in rows]
    return (f" The rows of {' and '.join(reused)} both chose the checkpoint and are reported in the models table, so those "
            "figures are not held out (`evaluate.select_on` gives rows that only choose).")


def checkpoint_rows(run: RunRecord) -> list[tuple[str, ...]]:
    """The trade-off: (model, share restored, harmful rate, task score, within the floor, chosen)
    for tuned, each checkpoint of the final schedule, and base when it was evaluated on the same rows."""
    tradeoff = run.tradeoff
    rows = [("tuned", "0", number(tradeoff.tuned_harmful_rate, percent=True), number(tradeoff.tuned), "", "")]
    for c in tradeoff.checkpoints:
        rows.append((f"step {c.step}", f"{c.share_of_N:.3%}", number(c.harmful_rate, percent=True), number(c.score),
                     "yes" if c.meets_floor else "no", "chosen" if c.chosen else ""))
    base = run.evaluation.models.get("base") if run.evaluation else None
    if base and chosen_on_reported_rows(run.evaluation):
        rows.append(("base", "–", number(base.harmful_rate, percent=True), number(base.task_score), "", ""))
    return rows


def tradeoff_lines(run: RunRecord) -> list[str]:
    """Markdown: how the method chose (as it says it), which rows chose, and the table of checkpoints."""
    chosen_by = run.tradeoff.chosen_by
    lines = [(chosen_by + "." + _rows_sentence(run.evaluation)) if chosen_by else _rows_sentence(run.evaluation).strip(), "",
             "| model | restored (share of N) | harmful rate | task score | within floor | |", "|---|---|---|---|---|---|"]
    return lines + [f"| {' | '.join(row)} |" for row in checkpoint_rows(run)]


def render_markdown(run: RunRecord) -> str:
    """report.md: what a person reads first in the output folder."""
    evaluation = run.evaluation
    lines = [
        "# surgeon repair report",
        "",
        *([] if run.harm_measured else [HARM_NOT_MEASURED_NOTE, ""]),
        f"surgeon {run.tool['version']}, method {run.method}; base `{run.inputs['base']['reference']}`, "
        f"tuned `{run.inputs['tuned']['reference']}`.",
        run.change + ".",
        "",
    ]
    if evaluation and evaluation.models:
        rows = model_rows(evaluation)
        direction = "" if evaluation.higher_is_better is None else (" (higher is better)" if evaluation.higher_is_better else " (lower is better)")
        lines += [
            f"## Models (judge: {evaluation.judge or '–'} on {safety_rows_text(evaluation)}; over-refusal on "
            f"{evaluation.benign_prompts} harmless prompts; task: {evaluation.metric or '–'}{direction} on {evaluation.task_rows} rows)",
            "",
            "| model | harmful rate | degenerate | over-refusal | KL from tuned | task score | restored weights | seconds |",
            "|---|---|---|---|---|---|---|---|",
            *[f"| {' | '.join(row)} |" for row in rows],
            "",
            *([INTERVALS, ""] if bracketed(rows) else []),
        ]
    if category_lines(evaluation):
        lines += ["## Harmful rate per category", "", *category_lines(evaluation), ""]
    if evaluation and evaluation.examples:
        lines += ["## Answers", "", *answer_lines(evaluation.examples), ""]
    if run.tradeoff and run.tradeoff.checkpoints:
        lines += ["## Checkpoints", "", *tradeoff_lines(run), ""]
    if run.record:
        lines += run.record.report_sections(run)
    return "\n".join(lines).rstrip("\n") + "\n"
