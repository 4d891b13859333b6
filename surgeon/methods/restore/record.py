"""restore's part of surgeon.json and how report.md, the card and `surgeon run` show it. No torch."""

from __future__ import annotations

from surgeon.records import MethodRecord, Record, RunRecord
from surgeon.report import number

STOPPED = {"steps": "ran all {steps} steps (restore.steps)", "stop_at": "stopped when the harmful rate reached restore.stop_at",
           "patience": "stopped when restore.stop_at.patience checkpoints in a row lowered the harmful rate no further",
           "floor": "stopped when the task score went past the floor"}


def chosen_by(stopped: str, steps: int, select: str) -> str:
    """The trade-off's sentence: why the schedule ended and how the checkpoint was chosen."""
    return f"The schedule {STOPPED[stopped].format(steps=steps)}; the checkpoint was chosen by `{select}`"


class Step(Record):
    step: int
    phase: str  # restore-only, or restore+rollback
    restored: int
    reverted: int
    total_restored: int
    harm_cosine: float
    seconds: float


class Restored(Record):
    total: int
    share_of_N: float
    by_layer: dict[int, int]
    by_module: dict[str, int]


class RestoreRecord(MethodRecord):
    restored: Restored
    steps: list[Step]
    warmup: float | None  # the task score after the warm-up (a rollback restart discards it)
    rollback_used: bool
    stopped: str  # a key of STOPPED

    def step_rows(self, run: RunRecord) -> list[tuple[str, ...]]:
        """(step, phase, restored, reverted, restored so far, harmful rate, task score, mark) per step.
        Checkpoints belong to the last phase run; after a rollback restart, the discarded warm-up
        shows only its own gate score, on its last step."""
        tradeoff, steps = run.tradeoff, self.steps
        final_phase = steps[-1].phase if steps else None
        checkpoints = {c.step: c for c in tradeoff.checkpoints}
        rows = []
        for index, step in enumerate(steps):
            harm = score = None
            if step.phase == final_phase:
                c = checkpoints.get(step.step)
                harm, score = (c.harmful_rate, c.score) if c else (None, None)
                mark = "chosen" if tradeoff.chosen_step == step.step else ("past floor" if c and not c.meets_floor else "")
            else:
                last_of_warmup = steps[index + 1].phase == final_phase
                score = self.warmup if last_of_warmup else None
                mark = "past floor: discarded, restarted with rollback" if last_of_warmup else ""
            rows.append((str(step.step), step.phase, f"{step.restored:,}", f"{step.reverted:,}", f"{step.total_restored:,}",
                         number(harm, percent=True), number(score), mark))
        return rows

    def report_sections(self, run: RunRecord) -> list[str]:
        lines = ["## Steps", "", "| step | phase | restored | reverted | restored so far | harmful rate | task score | |",
                 "|---|---|---|---|---|---|---|---|", *[f"| {' | '.join(row)} |" for row in self.step_rows(run)]]
        if run.tradeoff.floor is not None:
            lines += ["", f"Task floor {run.tradeoff.floor:.4f} (tuned {run.tradeoff.tuned:.4f}); "
                          f"rollback {'used' if self.rollback_used else 'not used'}."]
        return lines + [""]

    def card_sections(self, run: RunRecord) -> list[str]:
        peak = max(self.restored.by_layer.values(), default=0) or 1
        chart = [f"layer {layer:>3} {'█' * round(30 * count / peak):<30} {count:,}" for layer, count in self.restored.by_layer.items()]
        return ["## Restored weights", "", f"{self.restored.total:,} weights in all.", "", "| module | restored |", "|---|---|",
                *[f"| {module} | {count:,} |" for module, count in self.restored.by_module.items()], "", "```", *chart, "```", ""]

    def console_tables(self, run: RunRecord) -> list:
        from rich.table import Table

        table = Table(title="surgeon run", show_header=True)
        for column in ("step", "phase", "+restored", "-reverted", "total", "harm", "task", ""):
            table.add_column(column, justify="right" if column not in ("phase", "") else "left", no_wrap=True)
        for row in self.step_rows(run):
            table.add_row(*row[:-1], "← chosen" if row[-1] == "chosen" else row[-1])
        return [table]

    def summary_lines(self, run: RunRecord) -> list[str]:
        return ["rollback used: each step reverted the restored weights whose task gradient pulls back to tuned"] if self.rollback_used else []
