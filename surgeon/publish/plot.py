"""tradeoff.png: harmful rate against task score, the checkpoints as a path from tuned, base as a
point, the choice marked. Shown in the model card; written only when checkpoints have both scores."""

from __future__ import annotations

from pathlib import Path

from surgeon.records import RunRecord, TradeoffCheckpoint
from surgeon.report import chosen_on_reported_rows

PLOT_NAME = "tradeoff.png"


def write_tradeoff_plot(report: RunRecord, folder: Path) -> bool:
    """Whether the record has a trade-off with scored checkpoints to draw (then drawn)."""
    tradeoff, evaluation = report.tradeoff, report.evaluation
    points = [c for c in tradeoff.checkpoints if c.score is not None and c.harmful_rate is not None] if tradeoff else []
    if not points or tradeoff.tuned_harmful_rate is None:
        return False
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.4), dpi=100)
    axes = figure.add_subplot()
    path = [(tradeoff.tuned, tradeoff.tuned_harmful_rate)] + [(c.score, c.harmful_rate) for c in points]
    chosen = [c for c in points if c.chosen]
    _draw_path(axes, path, points, chosen, tradeoff.floor)
    base = evaluation.models.get("base") if evaluation else None
    if base and base.task_score is not None and base.harmful_rate is not None and chosen_on_reported_rows(evaluation):
        axes.plot(base.task_score, base.harmful_rate, "D", color="tab:green", label="base (aligned)")
        scores = [x for x, _ in path]
        if max(scores) - min(scores) < 0.2 * abs(base.task_score - tradeoff.tuned):
            # base sits far from the checkpoints (its task score is what fine-tuning bought): zoom on them
            inset = axes.inset_axes([0.3, 0.2, 0.45, 0.45])
            _draw_path(inset, path, points, chosen, tradeoff.floor)
            inset.set_title("checkpoints, zoomed", fontsize=8)
            inset.tick_params(labelsize=7)
            inset.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    better = "higher" if evaluation and evaluation.higher_is_better else "lower"
    axes.set_xlabel(f"task {(evaluation and evaluation.metric) or 'score'} ({better} is better)")
    axes.set_ylabel(f"harmful rate ({(evaluation and evaluation.judge) or 'judge'})")
    axes.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    axes.legend(fontsize=8)
    figure.tight_layout()
    # no Software/date metadata, so the same run writes the same bytes
    figure.savefig(folder / PLOT_NAME, metadata={"Software": None})
    return True


def _draw_path(axes, path: list[tuple[float, float]], points: list[TradeoffCheckpoint], chosen: list[TradeoffCheckpoint], floor: float | None) -> None:
    axes.plot(*zip(*path), "-o", color="tab:blue", markersize=4, label="checkpoints (from tuned)")
    for c in points:
        axes.annotate(str(c.step), (c.score, c.harmful_rate), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes.plot(*path[0], "s", color="tab:red", label="tuned")
    if chosen:
        axes.plot(chosen[0].score, chosen[0].harmful_rate, "*", color="gold", markeredgecolor="black", markersize=16,
                  label=f"chosen (step {chosen[0].step})")
    if floor is not None:
        axes.axvline(floor, linestyle="--", color="grey", linewidth=1, label="task floor")
    axes.grid(alpha=0.3)
