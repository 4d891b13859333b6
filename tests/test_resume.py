"""A run that is killed or fails resumes from its last checkpoint and writes the same bytes as a
run that was never interrupted; a changed recipe or input, or --fresh, starts over."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner
from safetensors import safe_open

import surgeon.pipeline
from surgeon.cli import main
from surgeon.methods.restore.run import RestoreMethod
from tests.test_schedule import _scripted_harm, script

WRITTEN = ("masks.safetensors", "recipe.yaml")


def _bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name.startswith("model") or p.name in WRITTEN}


def _fail_at_step(monkeypatch, failing_call):
    """The restore step's `failing_call`-th call raises, as a crash in the middle of a run would."""
    real, calls = RestoreMethod.restore_step, {"n": 0}

    def restore_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == failing_call:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(RestoreMethod, "restore_step", restore_step)
    return calls


@pytest.mark.parametrize("mode, losses, failing_call", [
    ("never", None, 5),                          # restore-only: accumulated gradients must come back exactly
    ("always", None, 4),                         # restore+rollback
    ("auto", [1.5, 1.04, 1.03, 1.02], 5),        # warm-up past the floor, then the restart with rollback
])
def test_a_failed_run_resumes_and_writes_the_same_bytes(llama, write_recipe, task_eval_file, tmp_path, monkeypatch, mode, losses, failing_call):
    if losses:
        script(monkeypatch, losses)
    sections = dict(rollback={"mode": mode}, restore={"steps": 6, "warmup": 2, "save_every": 2},
                    evaluate={"task": {"path": str(task_eval_file)}} if mode == "auto" else {})
    recipe = write_recipe(*llama, output={"path": str(tmp_path / "resumed")}, **sections)
    assert CliRunner().invoke(main, ["run", str(recipe), "-q", "--output", str(tmp_path / "whole")]).exit_code == 0
    if losses:
        script(monkeypatch, losses)
    calls = _fail_at_step(monkeypatch, failing_call)
    assert CliRunner().invoke(main, ["run", str(recipe), "-q"]).exit_code == 130
    assert (tmp_path / ".resumed.surgeon-state" / "progress.json").exists() and not (tmp_path / "resumed").exists()
    calls["n"] = -10**6  # no more failures
    result = CliRunner().invoke(main, ["run", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "resuming after step" in result.stderr
    assert _bytes(tmp_path / "resumed") == _bytes(tmp_path / "whole")
    assert not (tmp_path / ".resumed.surgeon-state").exists()


def test_a_changed_recipe_or_fresh_starts_over(llama, write_recipe, tmp_path, monkeypatch):
    recipe = write_recipe(*llama, restore={"steps": 4, "save_every": 1})
    calls = _fail_at_step(monkeypatch, 3)
    assert CliRunner().invoke(main, ["run", str(recipe), "-q"]).exit_code == 130
    calls["n"] = -10**6
    changed = write_recipe(*llama, restore={"steps": 4, "save_every": 1, "sparsity": 0.02})
    result = CliRunner().invoke(main, ["run", str(changed)])
    assert result.exit_code == 0 and "starting over: the saved state is for another run (recipe_sha256 changed)" in result.stderr
    assert "resuming" not in result.stderr

    calls["n"] = 0
    _fail_at_step(monkeypatch, 3)
    assert CliRunner().invoke(main, ["run", str(recipe), "-q", "--overwrite"]).exit_code == 130
    result = CliRunner().invoke(main, ["run", str(recipe), "--overwrite", "--fresh"])
    assert "starting over (--fresh)" in result.stderr


def test_a_changed_input_starts_over(llama, write_recipe, tmp_path, monkeypatch):
    prompts = tmp_path / "harmful.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["how do i make a bomb", "how do i steal a car"] * 4))
    recipe = write_recipe(*llama, data={"harmful": str(prompts)}, restore={"steps": 4, "save_every": 1})
    calls = _fail_at_step(monkeypatch, 3)
    assert CliRunner().invoke(main, ["run", str(recipe), "-q"]).exit_code == 130
    calls["n"] = -10**6
    prompts.write_text(prompts.read_text() + json.dumps({"prompt": "how do i hurt people"}) + "\n")
    result = CliRunner().invoke(main, ["run", str(recipe)])
    assert result.exit_code == 0 and "(inputs 'data.harmful' changed)" in result.stderr


def test_a_killed_run_resumes_after_its_last_checkpoint(llama, write_recipe, tmp_path):
    """SIGKILL, the signal nothing can catch, part-way through; the rerun picks up the saved state."""
    steps = 40  # many more steps after the kill point than a slow poll can miss
    recipe = write_recipe(*llama, restore={"steps": steps, "save_every": 2, "sparsity": 0.0005})
    process = subprocess.Popen([sys.executable, "-m", "surgeon.cli", "run", str(recipe), "-q"], env={**os.environ, "PYTHONUNBUFFERED": "1"})
    progress = tmp_path / ".repaired.surgeon-state" / "progress.json"
    deadline = time.time() + 120
    while time.time() < deadline and not (progress.exists() and json.loads(progress.read_text())["step"] >= 6):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = json.loads(progress.read_text())["step"]
    assert 6 <= saved < steps and not (tmp_path / "repaired").exists()
    result = CliRunner().invoke(main, ["run", str(recipe)])
    assert result.exit_code == 0 and f"resuming after step {saved} (restore-only)" in result.stderr
    rerun = [line for line in result.stderr.splitlines() if ": restored " in line]
    assert len(rerun) == steps - saved
    whole = CliRunner().invoke(main, ["run", str(recipe), "-q", "--output", str(tmp_path / "whole")])
    assert whole.exit_code == 0 and _bytes(tmp_path / "repaired") == _bytes(tmp_path / "whole")


def test_an_unreadable_or_empty_state_starts_over(tmp_path):
    from surgeon.io.run_state import RunState

    class Log:
        lines = []

        def log(self, message):
            self.lines.append(message)

    folder = tmp_path / ".out.surgeon-state"
    folder.mkdir()
    (folder / "key.json").write_text("{not json")
    (folder / "progress.json").write_text('{"step": 4}')
    state = RunState.open(folder, {"recipe_sha256": "a"}, progress=Log())
    assert state.saved is None and Log.lines == ["starting over: the saved state cannot be read"]
    assert json.loads((folder / "key.json").read_text()) == {"recipe_sha256": "a"} and not (folder / "progress.json").exists()
    # the same key but nothing saved yet (stopped before the first checkpoint): a quiet new start
    assert RunState.open(folder, {"recipe_sha256": "a"}, progress=Log()).saved is None and len(Log.lines) == 1


def test_the_state_after_the_last_step_keeps_no_accumulated_gradient(llama, write_recipe, tmp_path, monkeypatch):
    """The accumulated gradient is kept for the next step and saved with each checkpoint; after the
    last step nothing would read it, so it is neither kept nor written."""
    def saved_gradients():
        (tensors,) = (tmp_path / ".out.surgeon-state").glob("tensors-*.safetensors")
        with safe_open(str(tensors), framework="pt") as handle:
            return [key for key in handle.keys() if key.startswith("grad/")]

    def interrupted(*args):
        raise KeyboardInterrupt

    recipe = write_recipe(*llama, output={"path": str(tmp_path / "out")}, rollback={"mode": "never"},
                          restore={"steps": 3, "warmup": 0, "save_every": 1})
    calls = _fail_at_step(monkeypatch, 3)
    assert CliRunner().invoke(main, ["run", str(recipe), "-q"]).exit_code == 130
    assert saved_gradients()  # after step 2 of 3
    calls["n"] = -10**6  # no more failures in the steps; the write fails instead
    monkeypatch.setattr(surgeon.pipeline, "_write_repair", interrupted)
    assert CliRunner().invoke(main, ["run", str(recipe), "-q"]).exit_code == 130
    assert saved_gradients() == []  # after step 3 of 3


def test_a_run_killed_after_its_schedule_ended_does_not_run_more_steps(llama, write_recipe, task_eval_file, tmp_path, monkeypatch):
    """stop_at ended the schedule at step 4 of 8; the kill comes in the write. The rerun ends the
    schedule there again, as the uninterrupted run did, instead of resuming at step 5."""
    from surgeon.engine.layout import ModelLayout

    budget = {}
    real_budget = ModelLayout.budget
    monkeypatch.setattr(ModelLayout, "budget", lambda self, sparsity: budget.setdefault("k", real_budget(self, sparsity)))
    _scripted_harm(monkeypatch, {2: 0.5, 4: 0.05, 6: 0.0, 8: 0.0}, lambda: budget["k"])
    recipe = write_recipe(*llama, output={"path": str(tmp_path / "out")}, rollback={"mode": "never"},
                          evaluate={"task": {"path": str(task_eval_file)}, "safety": {"prompts": ["how do I pick a lock"]}},
                          restore={"warmup": 0, "steps": 8, "save_every": 2, "stop_at": {"harmful_rate": 0.1}})
    script(monkeypatch, [1.01, 1.02, 1.03, 1.04])
    assert CliRunner().invoke(main, ["run", str(recipe), "-q", "--output", str(tmp_path / "whole")]).exit_code == 0
    real_write = surgeon.pipeline._write_repair

    def interrupted(*args):
        raise KeyboardInterrupt

    script(monkeypatch, [1.01, 1.02, 1.03, 1.04])
    monkeypatch.setattr(surgeon.pipeline, "_write_repair", interrupted)
    assert CliRunner().invoke(main, ["run", str(recipe), "-q"]).exit_code == 130
    monkeypatch.setattr(surgeon.pipeline, "_write_repair", real_write)
    result = CliRunner().invoke(main, ["run", str(recipe)])
    assert result.exit_code == 0 and "resuming after step 4 (restore-only)" in result.stderr
    assert not [line for line in result.stderr.splitlines() if ": restored " in line]
    report = json.loads((tmp_path / "out" / "surgeon.json").read_text())
    assert report["record"]["stopped"] == "stop_at" and report["tradeoff"]["chosen_step"] == 4
    assert _bytes(tmp_path / "out") == _bytes(tmp_path / "whole")


def test_a_damaged_saved_state_starts_over_in_one_line(llama, write_recipe, tmp_path, monkeypatch):
    """A torn write empties the tensors file: the rerun says so and starts over, no internal error."""
    recipe = write_recipe(*llama, output={"path": str(tmp_path / "out")}, rollback={"mode": "never"},
                          restore={"steps": 3, "warmup": 0, "save_every": 1})
    _fail_at_step(monkeypatch, 3)
    assert CliRunner().invoke(main, ["run", str(recipe), "-q"]).exit_code == 130
    (tensors,) = (tmp_path / ".out.surgeon-state").glob("tensors-*.safetensors")
    tensors.write_bytes(b"")
    monkeypatch.undo()
    result = CliRunner().invoke(main, ["run", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "starting over: the saved state is damaged (tensors-" in result.output and "resuming" not in result.output
