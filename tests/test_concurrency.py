"""One run at a time per output: a destination lock held for the whole run, a commit that keeps what
appeared at the destination meanwhile, and stale-run cleanup that never sweeps a live run."""

import fcntl
import json
import os

import pytest
from click.testing import CliRunner

from surgeon import pipeline
from surgeon.cli import main
from surgeon.errors import OutputError
from surgeon.io.atomic import lock_path, remove_stale
from surgeon.recipe import load_recipe


def test_a_second_run_to_a_locked_output_is_refused_naming_the_first(llama, write_recipe, tmp_path):
    recipe = write_recipe(*llama)
    destination = tmp_path / "repaired"
    with open(lock_path(destination), "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242 on elsewhere\n")
        held.flush()
        result = CliRunner().invoke(main, ["run", str(recipe)])
        assert result.exit_code == 2 and "another surgeon run (pid 4242 on elsewhere) is writing this output" in result.output
        assert not destination.exists()
    assert CliRunner().invoke(main, ["run", str(recipe), "-q"]).exit_code == 0  # the kernel drops the lock with its holder


def test_a_folder_made_at_the_destination_during_the_run_is_kept(llama, write_recipe, tmp_path, monkeypatch):
    recipe = write_recipe(*llama)
    destination = tmp_path / "repaired"
    write_records = pipeline.write_records

    def user_makes_the_folder(*args, **kwargs):
        destination.mkdir()
        (destination / "mine.txt").write_text("the user's\n")
        return write_records(*args, **kwargs)

    monkeypatch.setattr(pipeline, "write_records", user_makes_the_folder)
    with pytest.raises(OutputError, match="the destination changed during the run and was left as it is; the result is in"):
        pipeline.run(load_recipe(recipe))
    assert sorted(p.name for p in destination.iterdir()) == ["mine.txt"]
    aside = tmp_path / f"repaired.surgeon-{os.getpid()}"
    assert (aside / "surgeon.json").exists() and list(aside.glob("model*.safetensors"))


def test_stale_cleanup_spares_a_run_whose_lock_is_held(tmp_path, monkeypatch):
    """A run in another PID namespace has a pid this one cannot see: its lock says it is alive."""
    monkeypatch.setenv("SURGEON_CACHE", str(tmp_path / "cache"))
    registry = tmp_path / "cache" / "runs"
    registry.mkdir(parents=True)
    live = tmp_path / ".out.surgeon-tmp-999999"
    live.mkdir()
    lock = lock_path(tmp_path / "out")
    (registry / "999999.json").write_text(json.dumps({"pid": 999999, "lock": str(lock), "paths": [str(live)]}))
    with open(lock, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        remove_stale()
        assert live.exists()
    remove_stale()  # its holder gone: swept
    assert not live.exists()
