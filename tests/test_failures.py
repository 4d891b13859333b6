"""Nothing half-written at the destination, inputs never modified, whatever happens."""

import hashlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from surgeon.errors import TaskFloorError
from surgeon.engine.layered import Whole
from surgeon.evaluation.streamed import TaskLoss
from surgeon.pipeline import run
from surgeon.recipe import load_recipe


def _digest(folder):
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def test_inputs_are_not_modified(llama, write_recipe, task_eval_file):
    before = [_digest(f) for f in llama]
    run(load_recipe(write_recipe(*llama, rollback={"mode": "auto"}, restore={"warmup": 1}, evaluate={"task": {"path": str(task_eval_file)}}))).dump()
    assert [_digest(f) for f in llama] == before


@pytest.mark.slow  # builds a model or runs a subprocess
def test_kill_during_writing_leaves_nothing_at_the_destination(tmp_path):
    destination = tmp_path / "out"
    script = textwrap.dedent(f"""
        import time, torch
        from pathlib import Path
        from surgeon.io.atomic import AtomicOutputDir
        from surgeon.io.writer import TensorEntry, write_sharded
        def slow(name):
            time.sleep(0.2)
            return torch.zeros(256)
        entries = [TensorEntry(f"t{{i}}", (256,), torch.float32) for i in range(200)]
        with AtomicOutputDir(Path({str(destination)!r})) as out:
            write_sharded(out.temporary, entries, slow, max_shard_bytes=4096)
            out.commit()
    """)
    process = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while time.time() < deadline and not list(tmp_path.glob(".out.surgeon-tmp-*/model-00002-*")):
        time.sleep(0.05)
    assert list(tmp_path.glob(".out.surgeon-tmp-*/model-00002-*")), "the writer never got going"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not destination.exists()
    leftovers = list(tmp_path.glob(".out.surgeon-tmp-*"))
    assert leftovers  # SIGKILL leaves the hidden temp folder; the next run removes it

    from surgeon.io.atomic import AtomicOutputDir

    with AtomicOutputDir(destination) as out:
        (out.temporary / "x").write_text("done")
        out.commit()
    assert (destination / "x").read_text() == "done"
    assert not any(p.exists() for p in leftovers)


def test_a_failure_mid_run_leaves_no_destination_and_no_temp(llama, write_recipe, tmp_path, monkeypatch):
    def failing_writer(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("surgeon.io.repaired.write_sharded", failing_writer)
    with pytest.raises(OSError):
        run(load_recipe(write_recipe(*llama))).dump()
    assert not (tmp_path / "repaired").exists()
    assert [p.name for p in tmp_path.iterdir() if ".surgeon-" in p.name] == [".repaired.surgeon-state"]  # kept to resume


def test_overwrite_keeps_the_old_output_when_the_new_run_fails(llama, write_recipe, tmp_path, monkeypatch):
    from surgeon.recipe.options import RunOptions

    recipe = load_recipe(write_recipe(*llama))
    run(recipe)
    before = _digest(tmp_path / "repaired")
    monkeypatch.setattr("surgeon.io.repaired.write_sharded", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        run(recipe, RunOptions(overwrite=True))
    assert _digest(tmp_path / "repaired") == before


def _scripted_loss(monkeypatch, repaired_loss):
    """Task loss 1.0 for base and tuned and `repaired_loss(restored count)` for any repaired model."""

    def score(self, plan):
        return 1.0 if isinstance(plan, Whole) else repaired_loss(plan.count())

    monkeypatch.setattr(TaskLoss, "__call__", score)


def test_no_checkpoint_within_the_floor_writes_nothing(llama, write_recipe, task_eval_file, tmp_path, monkeypatch):
    _scripted_loss(monkeypatch, lambda restored: 2.0)
    recipe = write_recipe(*llama, rollback={"mode": "always"}, evaluate={"task": {"path": str(task_eval_file)}})
    with pytest.raises(TaskFloorError, match="floor 1.0500"):
        run(load_recipe(recipe)).dump()
    assert not (tmp_path / "repaired").exists()


def test_write_below_floor_writes_the_best_scoring_checkpoint(llama, write_recipe, task_eval_file, tmp_path, monkeypatch):
    _scripted_loss(monkeypatch, lambda restored: 2.0 + restored / 1e6)
    recipe = write_recipe(*llama, rollback={"mode": "never"}, evaluate={"task": {"path": str(task_eval_file)}},
                          output={"path": str(tmp_path / "repaired"), "write_below_floor": True})
    report = run(load_recipe(recipe)).dump()
    assert report["tradeoff"]["chosen_step"] is None and (tmp_path / "repaired" / "masks.safetensors").exists()
    assert report["record"]["restored"]["total"] == report["record"]["steps"][0]["total_restored"]
