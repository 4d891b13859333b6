"""Terminal rendering for the CLI: rich progress bars and tables, or timestamped lines in a log.
The engine never imports this."""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text


class _RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed:.2f} it/s" if task.speed else "", style="dim")


class RichProgress:
    """One bar per phase, with items per second; log lines print above the bars."""

    def __init__(self, console: Console, show_bars: bool = True, show_log: bool = True):
        self.console, self.show_bars, self.show_log = console, show_bars, show_log
        self._progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            _RateColumn(), TimeElapsedColumn(),
            console=console, transient=True, disable=not show_bars,
        )

    def __enter__(self):
        self._progress.start()
        return self

    def __exit__(self, *exc):
        self._progress.stop()

    @contextmanager
    def task(self, description: str, total: float | None):
        progress = self._progress
        task_id = progress.add_task(description, total=total)

        class _Task:
            def advance(self, amount: float = 1) -> None:
                progress.advance(task_id, amount)

            def detail(self, text: str) -> None:
                progress.update(task_id, description=f"{description} · {text}")

        try:
            yield _Task()
        finally:
            progress.remove_task(task_id)

    def log(self, message: str) -> None:
        if self.show_log:
            self.console.log(message)


class _LoggedTask:
    def __init__(self, description: str, total: float | None):
        self.description, self.total = description, total
        self.completed, self.text = 0.0, ""
        self.started = time.monotonic()

    def advance(self, amount: float = 1) -> None:
        self.completed += amount

    def detail(self, text: str) -> None:
        self.text = text

    def state(self) -> str:
        count = f" {self.completed:g}/{self.total:g}" if self.total else ""
        detail = f", {self.text}" if self.text else ""
        return f"{self.description}:{count}{detail} ({time.monotonic() - self.started:.0f}s)"


class LogProgress:
    """For output that is not a terminal (a log file, CI, nohup): a timestamped line when a
    phase starts and ends, and a line on the innermost phase whenever `interval` seconds pass
    without one, so a log never goes quiet during long work."""

    def __init__(self, stream=None, interval: float = 30.0):
        self.stream, self.interval = stream, interval
        self._tasks: list[_LoggedTask] = []
        self._lock = threading.Lock()
        self._last_line = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, name="surgeon-progress", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _line(self, text: str) -> None:
        with self._lock:
            stream = self.stream or sys.stderr
            stream.write(f"{datetime.now():%Y-%m-%d %H:%M:%S} {text}\n")
            stream.flush()
            self._last_line = time.monotonic()

    def _heartbeat(self) -> None:
        while not self._stop.wait(min(self.interval, 1.0)):
            tasks = list(self._tasks)  # a snapshot: the main thread adds and removes tasks meanwhile
            if tasks and time.monotonic() - self._last_line >= self.interval:
                self._line(tasks[-1].state())

    @contextmanager
    def task(self, description: str, total: float | None):
        task = _LoggedTask(description, total)
        self._line(f"{description}: started" + (f", {total:g} to do" if total else ""))
        self._tasks.append(task)
        try:
            yield task
        finally:
            self._tasks.remove(task)
            self._line(f"{description}: done {task.completed:g}" + (f"/{total:g}" if total else "") + f" in {time.monotonic() - task.started:.1f}s")

    def log(self, message: str) -> None:
        self._line(message)


def models_table(evaluation) -> Table | None:
    """The final table (a records.Evaluation: a run's or `surgeon eval`'s)."""
    from surgeon.report import bracketed, model_rows

    rows = model_rows(evaluation)
    if not rows:
        return None
    table = Table(title=f"judge: {evaluation.judge or '–'} · task metric: {evaluation.metric or '–'}"
                  + (" · [95% intervals]" if bracketed(rows) else ""))
    # degenerate, over-refusal, KL, restored weights: only where some model has one
    shown = {i: any(row[i] != "–" for row in rows) for i in (2, 3, 4, 6)}
    table.add_column("model", overflow="fold")
    for i, column in enumerate(("harmful rate", "degenerate", "over-refusal", "KL from tuned", "task score", "restored weights", "seconds"), 1):
        if shown.get(i, True):
            table.add_column(column, justify="right", no_wrap=True)
    for row in rows:
        table.add_row(*(value for i, value in enumerate(row) if shown.get(i, True)))
    return table


def categories_table(evaluation) -> Table | None:
    from surgeon.report import category_rows

    models, rows = category_rows(evaluation)
    if not rows:
        return None
    table = Table(title="harmful rate per category")
    table.add_column("category", overflow="fold")
    for model in models:
        table.add_column(model, justify="right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    return table


def summary_lines(run, destination) -> list[str]:
    """What `surgeon run` prints last (a records.RunRecord): the change, the task floor, time and memory."""
    from surgeon.report import HARM_NOT_MEASURED

    seconds = sum(run.seconds.values())
    lines = ([] if run.harm_measured else [f"warning: {HARM_NOT_MEASURED}"]) + [f"{run.method}: {run.change}"]
    tradeoff = run.tradeoff
    if tradeoff and tradeoff.tuned is not None and tradeoff.floor is not None:
        lines.append(f"task {run.evaluation.metric if run.evaluation else 'score'}: tuned {tradeoff.tuned:.4f}, floor {tradeoff.floor:.4f}")
    lines += run.record.summary_lines(run) if run.record else []
    lines.append(f"wall {seconds:.1f}s, peak RSS {run.peak_memory['rss_bytes'] / 2**30:.2f} GiB → {destination}")
    return lines
