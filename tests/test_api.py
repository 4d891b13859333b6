"""The Python API: the functions the CLI calls, usable from a notebook or a training script."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import surgeon
from surgeon.errors import RecipeValidationError
from surgeon.tiny import HARMFUL, write_jsonl
from tests.conftest import recipe_dict

ROOT = Path(__file__).resolve().parents[1]


def test_importing_surgeon_loads_no_torch():
    """`import surgeon` and its recipe objects stay light: torch comes with the first repair."""
    code = "import sys, surgeon; surgeon.Recipe; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_a_recipe_from_python_repairs_like_the_cli(llama, tmp_path):
    data = recipe_dict(*llama, restore={"sparsity": 0.01, "steps": 2, "warmup": 0, "save_every": 1})
    data["evaluate"] = {"safety": {"prompts": HARMFUL[:4], "max_new_tokens": 4}, "benign": "none",
                        "task": {"path": str(write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "response": "b"}] * 4)), "metric": "loss"}}
    recipe = surgeon.Recipe.from_dict(data, folder=tmp_path)
    assert recipe.settings.restore.steps == 2 and recipe.validate()
    result = surgeon.repair(recipe, output=tmp_path / "out", overrides={"restore.steps": 1})
    assert result.output == (tmp_path / "out").resolve() and (result.output / "surgeon.json").exists()
    assert result.method == "restore" and result.chosen_step == 1 and result.record.settings["steps"] == 1
    assert set(result.scores) == {"base", "tuned", "repaired"} and result.scores["repaired"].harmful_rate is not None
    assert recipe.settings.restore.steps == 2  # an override changes the run, not the recipe
    # the CLI's recipe.yaml is the recipe as written, with the override merged in
    assert "steps: 1" in (result.output / "recipe.yaml").read_text()
    table = surgeon.evaluate(["tuned", str(result.output)], recipe=recipe, benign="none")
    assert "harmful_rate" in table.models[str(result.output)].change_from_first


def test_overrides_are_checked_like_the_cli_set(llama, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(f"method: linear\nbase: {llama[0]}\ntuned: {llama[1]}\n")
    assert surgeon.Recipe.load(path, {"linear.alpha": 0.25}).settings.linear.alpha == 0.25
    with pytest.raises(RecipeValidationError, match=r"linear\.alpha.*--set linear\.alpha=2"):
        surgeon.Recipe.load(path, {"linear.alpha": 2})
    with pytest.raises(RecipeValidationError, match="did you mean 'alpha'"):
        surgeon.Recipe.load(path).override({"linear.alhpa": 0.3})


@pytest.mark.slow  # builds a model or runs a subprocess
def test_the_python_example_runs(tmp_path):
    for name in ("harmful.jsonl", "task.jsonl"):
        shutil.copy(ROOT / "examples" / "tiny" / name, tmp_path / name)
    subprocess.run([sys.executable, "-m", "surgeon.tiny", str(tmp_path / "models"), "--arch", "llama"], check=True, capture_output=True)
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "python_api.py"), "--tiny", str(tmp_path), "--output", str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "restore wrote" in done.stdout and "repaired minus tuned" in done.stdout


def test_repair_with_an_override_writes_the_bytes_surgeon_run_writes(llama, write_recipe, tmp_path):
    from click.testing import CliRunner

    from surgeon.cli import main

    recipe = write_recipe(*llama, restore={"sparsity": 0.01, "steps": 3, "warmup": 0, "save_every": 1})
    by_cli = CliRunner().invoke(main, ["run", str(recipe), "--set", "restore.steps=1", "-o", str(tmp_path / "cli"), "-q"])
    assert by_cli.exit_code == 0, by_cli.output
    surgeon.repair(recipe, output=tmp_path / "api", overrides={"restore.steps": 1})
    written = lambda folder: {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix == ".safetensors" or p.name == "recipe.yaml"}
    assert written(tmp_path / "api") == written(tmp_path / "cli") and "masks.safetensors" in written(tmp_path / "api")
