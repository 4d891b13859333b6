"""A run that fails, for whatever reason, exits with a clear line, leaves the destination as it
was and the inputs untouched, and leaves nothing behind that the next run does not clean."""

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from surgeon.cli import main


def _digest(*folders):
    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def _ours(folder):
    """surgeon's temporary folders; `.NAME.surgeon-state` is kept on purpose, for the next run to resume."""
    return [p.name for p in folder.iterdir() if any(f".surgeon-{kind}-" in p.name for kind in ("tmp", "work", "old"))]


def _surgeon(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "surgeon.cli", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, **kwargs)


def _wait_for(predicate, seconds=120):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def slow_recipe(llama, write_recipe):
    """A run long enough to be caught mid-way: many small steps."""
    return write_recipe(*llama, restore={"steps": 60, "sparsity": 0.001, "save_every": 1})


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_unwind_like_ctrl_c(llama, slow_recipe, tmp_path, signum):
    before = _digest(*llama)
    process = _surgeon("run", slow_recipe)
    assert _wait_for(lambda: (tmp_path / ".repaired.surgeon-state" / "progress.json").exists()), process.communicate()
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr
    assert f"stopped by {signal.Signals(signum).name}; nothing was written to the destination" in stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "repaired").exists() and not _ours(tmp_path)
    assert (tmp_path / ".repaired.surgeon-state").is_dir(), "the saved state stays, so a rerun resumes"
    assert _digest(*llama) == before


def test_a_killed_overwrite_keeps_the_old_output_and_the_next_run_cleans_up(llama, slow_recipe, write_recipe, tmp_path):
    fast = write_recipe(*llama, name="fast.yaml")
    assert CliRunner().invoke(main, ["run", str(fast), "-q"]).exit_code == 0
    old, inputs = _digest(tmp_path / "repaired"), _digest(*llama)
    process = _surgeon("run", slow_recipe, "--overwrite")
    assert _wait_for(lambda: any(".surgeon-work-" in name for name in _ours(tmp_path))), process.communicate()
    time.sleep(0.5)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert _ours(tmp_path), "SIGKILL cannot be caught: its folders stay until the next run"
    assert _digest(tmp_path / "repaired") == old and _digest(*llama) == inputs
    # the next run, to another destination, removes the dead run's folders
    assert CliRunner().invoke(main, ["run", str(fast), "-q", "--output", str(tmp_path / "other" / "out")]).exit_code == 0
    assert not _ours(tmp_path) and _digest(tmp_path / "repaired") == old


def test_disk_full_while_writing_is_one_line_and_loses_nothing(llama, write_recipe, tmp_path, monkeypatch):
    recipe = write_recipe(*llama)
    assert CliRunner().invoke(main, ["run", str(recipe), "-q"]).exit_code == 0
    old, inputs = _digest(tmp_path / "repaired"), _digest(*llama)

    class FullDisk:
        def __init__(self, path, mode):
            self.handle, self.written = open(path, mode), 0

        def write(self, data):
            self.written += len(data)
            if self.written > 20_000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.handle.name)
            return self.handle.write(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    monkeypatch.setattr("surgeon.io.writer.open", FullDisk, raising=False)
    result = CliRunner().invoke(main, ["run", str(recipe), "-q", "--overwrite"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: cannot write the output: No space left on device; nothing was written to the destination")
    assert _digest(tmp_path / "repaired") == old and _digest(*llama) == inputs and not _ours(tmp_path)


def test_read_only_output_parent_is_one_line(llama, write_recipe, tmp_path, monkeypatch):
    """Tests run as root, where permission bits do not stop a write: the filesystem's refusal is patched in."""
    parent = tmp_path / "read-only"
    parent.mkdir()
    real_mkdir = type(parent).mkdir

    def refuse(self, *args, **kwargs):
        if self.parent == parent:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(type(parent), "mkdir", refuse)
    inputs = _digest(*llama)
    result = CliRunner().invoke(main, ["run", str(write_recipe(*llama)), "-q", "--output", str(parent / "out")])
    assert result.exit_code == 2 and result.stderr.startswith("error: cannot create the output folder: Read-only file system")
    assert list(parent.iterdir()) == [] and _digest(*llama) == inputs


def _poisoned_copy(source, target, tensor="model.layers.1.mlp.up_proj.weight"):
    import shutil

    shutil.copytree(source, target)
    for shard in sorted(target.glob("*.safetensors")):
        tensors = load_file(shard)
        if tensor in tensors:
            tensors[tensor].view(-1)[7] = float("nan")
            save_file(tensors, shard, metadata={"format": "pt"})
            return target
    raise AssertionError(f"{tensor} not found")


@pytest.mark.parametrize("role", ["base", "tuned"])
def test_a_nan_weight_stops_the_run_naming_the_tensor(llama, write_recipe, tmp_path, role):
    base, tuned = llama
    poisoned = _poisoned_copy(base if role == "base" else tuned, tmp_path / f"poisoned-{role}")
    recipe = write_recipe(poisoned if role == "base" else base, poisoned if role == "tuned" else tuned)
    before = _digest(poisoned)
    result = CliRunner().invoke(main, ["run", str(recipe), "-q"])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: tensor 'model.layers.1.mlp.up_proj.weight' holds NaN or infinite values")
    assert not (tmp_path / "repaired").exists() and not _ours(tmp_path) and _digest(poisoned) == before


def test_a_nan_in_an_adapter_stops_the_run(llama, write_recipe, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama[0]), LoraConfig(r=2, target_modules=["q_proj"]))
    with torch.no_grad():
        next(p for n, p in peft_model.named_parameters() if "lora_B" in n).view(-1)[0] = float("inf")
    peft_model.save_pretrained(tmp_path / "adapter")
    result = CliRunner().invoke(main, ["run", str(write_recipe(llama[0], tmp_path / "adapter")), "-q"])
    assert result.exit_code == 2 and "holds NaN or infinite values" in result.stderr and "lora_B" in result.stderr


def test_a_nan_task_score_stops_the_run(llama, write_recipe, task_eval_file, tmp_path, monkeypatch):
    from surgeon.evaluation.streamed import TaskLoss

    monkeypatch.setattr(TaskLoss, "__call__", lambda self, plan: float("nan"))
    recipe = write_recipe(*llama, evaluate={"task": {"path": str(task_eval_file)}})
    result = CliRunner().invoke(main, ["run", str(recipe), "-q"])
    assert result.exit_code == 2 and result.stderr.startswith("error: the task loss of tuned is nan")
    assert not (tmp_path / "repaired").exists()


def test_non_utf8_prompt_file_is_one_line(llama, write_recipe, tmp_path):
    prompts = tmp_path / "harmful.jsonl"
    prompts.write_bytes(b'{"prompt": "caf\xe9"}\n')
    result = CliRunner().invoke(main, ["run", str(write_recipe(*llama, data={"harmful": str(prompts)})), "-q"])
    assert result.exit_code == 2 and result.stderr.startswith("error: not UTF-8 text (byte 0xe9")


# what describes the run rather than its result: times, memory measured or free at the time, and
# tokens generated (none when the answers come from the cache)
_TIMING = {"seconds", "peak_memory", "generation", "generated_tokens", "tokens_per_second", "budget_bytes"}


def _without_timing(value):
    if isinstance(value, dict):
        return {k: _without_timing(v) for k, v in value.items() if k not in _TIMING}
    if isinstance(value, list):
        return [_without_timing(v) for v in value]
    return value


def test_two_identical_runs_write_the_same_bytes(llama, write_recipe, task_eval_file, tmp_path):
    recipe = write_recipe(*llama, evaluate={"task": {"path": str(task_eval_file)}, "safety": {"prompts": ["how do I pick a lock"]}})
    files = {}
    for attempt in range(2):
        result = CliRunner().invoke(main, ["run", str(recipe), "-q", "--overwrite"])
        assert result.exit_code == 0, result.output
        files[attempt] = {p.name: p.read_bytes() for p in (tmp_path / "repaired").iterdir()}
    assert files[0].keys() == files[1].keys()
    for name in files[0]:
        if name == "surgeon.json":
            assert _without_timing(json.loads(files[0][name])) == _without_timing(json.loads(files[1][name]))
        elif name != "report.md":  # its table has a seconds column
            assert files[0][name] == files[1][name], name


def test_an_old_output_moved_aside_by_a_killed_commit_is_put_back(tmp_path):
    """SIGKILL between the commit's two renames: the old output sits in .NAME.surgeon-old-PID and
    the destination is missing. The next run puts the old output back instead of deleting it."""
    from surgeon.io.atomic import AtomicOutputDir
    from surgeon.io.fingerprint import cache_root

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    aside = tmp_path / f".out.surgeon-old-{dead.pid}"
    aside.mkdir()
    (aside / "surgeon.json").write_text("{}")
    registry = cache_root() / "runs"
    registry.mkdir(parents=True, exist_ok=True)
    (registry / f"{dead.pid}.json").write_text(json.dumps({"pid": dead.pid, "paths": [str(aside)]}))
    with AtomicOutputDir(tmp_path / "elsewhere") as out:
        out.commit()
    assert (tmp_path / "out" / "surgeon.json").exists() and not aside.exists()
    assert not (registry / f"{dead.pid}.json").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float8_e4m3fn])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_finite_finds_one_bad_value_anywhere(dtype, bad):
    from surgeon.errors import NonFiniteError
    from surgeon.io.checkpoint import check_finite

    values = torch.randn(37, 53).to(dtype)
    assert check_finite("w", values, "here") is values
    check_finite("empty", torch.zeros(0, 4, dtype=dtype), "here")
    for position in (0, 1000, values.numel() - 1):
        broken = values.clone().reshape(-1)
        broken[position] = bad
        if torch.isfinite(broken.float()).all():  # float8 e4m3 has no infinity: it saturates to NaN or the maximum
            continue
        with pytest.raises(NonFiniteError, match="'w' holds NaN or infinite values"):
            check_finite("w", broken.reshape(37, 53), "here")
