"""The gate of method.md: warm-up, rollback restart, checkpoint choice. Scores are scripted."""

from surgeon.evaluate.streamed import TaskLoss
from surgeon.pipeline import run
from surgeon.recipe import load_recipe
from surgeon.report import render_markdown


def script(monkeypatch, repaired_losses):
    """base and tuned score 1.0 (floor 1.05 for a loss); each new repaired state gets the next listed
    loss, and the same state scores the same when asked again (the final table re-scores the choice)."""
    losses, seen = iter(repaired_losses), {}

    def score(self, plan):
        if isinstance(plan, str):
            return 1.0
        if plan.digest() not in seen:
            seen[plan.digest()] = next(losses)
        return seen[plan.digest()]

    monkeypatch.setattr(TaskLoss, "__call__", score)


def _run(llama, write_recipe, task_eval_file, **restore):
    recipe = write_recipe(*llama, rollback={"mode": "auto"}, evaluate={"task": {"path": str(task_eval_file)}},
                          restore={"warmup": 2, "steps": 4, "save_every": 2, **restore})
    return run(load_recipe(recipe))


def test_warmup_within_the_floor_continues_restore_only(llama, write_recipe, task_eval_file, monkeypatch):
    script(monkeypatch, [1.01, 1.02])
    report = _run(llama, write_recipe, task_eval_file)
    assert not report["task"]["rollback_used"] and report["task"]["warmup"] == 1.01
    assert [s["phase"] for s in report["steps"]] == ["restore-only"] * 4
    assert [c["step"] for c in report["task"]["checkpoints"]] == [2, 4] and report["task"]["chosen_step"] == 4
    assert [s["total_restored"] for s in report["steps"]] == [report["settings"]["budget"] * i for i in (1, 2, 3, 4)]


def test_warmup_past_the_floor_restarts_from_tuned_with_rollback(llama, write_recipe, task_eval_file, monkeypatch):
    script(monkeypatch, [1.5, 1.04, 1.2])
    report = _run(llama, write_recipe, task_eval_file)
    task = report["task"]
    assert task["rollback_used"] and task["warmup"] == 1.5
    assert [s["phase"] for s in report["steps"]] == ["restore-only"] * 2 + ["restore+rollback"] * 4
    assert [s["step"] for s in report["steps"]] == [1, 2, 1, 2, 3, 4]
    assert all(s["reverted"] > 0 for s in report["steps"][2:])
    # the warm-up's checkpoints are discarded; the latest one within the floor wins
    assert [(c["step"], c["meets_floor"]) for c in task["checkpoints"]] == [(2, True), (4, False)]
    assert task["chosen_step"] == 2
    restarted = report["steps"][2]
    assert restarted["total_restored"] == restarted["restored"] - restarted["reverted"]
    assert report["restored"]["total"] == report["steps"][3]["total_restored"]
    # the discarded warm-up shows its own score, not the restart's checkpoint of the same number
    table = [line for line in render_markdown(report).splitlines() if line.startswith("| 2 |")]
    assert len(table) == 2
    assert "1.5000" in table[0] and "discarded" in table[0] and "1.0400" not in table[0]
    assert "1.0400" in table[1] and "chosen" in table[1]


def test_checkpoint_choice_is_the_latest_within_the_floor(llama, write_recipe, task_eval_file, monkeypatch):
    script(monkeypatch, [1.01, 1.2, 1.03, 1.3])
    report = _run(llama, write_recipe, task_eval_file, steps=8)
    task = report["task"]
    assert [(c["step"], c["meets_floor"]) for c in task["checkpoints"]] == [(2, True), (4, False), (6, True), (8, False)]
    assert task["chosen_step"] == 6 and not task["rollback_used"]
    assert report["restored"]["total"] == report["steps"][5]["total_restored"]
