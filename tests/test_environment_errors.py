"""What the machine and the paths a user gives can do wrong is one line and exit 2, never an
internal error or a hang: names past the file system's limit, a cache that is a file, a device
this torch lacks, a Hub path that climbs out of its repository, a recipe that is a pipe."""

import os

import pytest
import yaml
from click.testing import CliRunner

from surgeon.cli import main
from tests.conftest import recipe_dict

LONG = "x" * 300  # past the 255 bytes a file name may have


def _one_line(result, *needles):
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 2, result.output
    last = result.stderr.splitlines()[-1]
    assert result.stderr.count("error: ") == 1 and last.startswith("error: ") and all(n in last for n in needles), result.stderr


@pytest.mark.parametrize("where", ["output", "data", "tuned"])
def test_a_name_too_long_for_the_file_system(llama, tmp_path, where):
    sections = {"output": {"path": str(tmp_path / (LONG if where == "output" else "out"))}}
    if where == "data":
        sections["data"] = {"harmful": {"path": str(tmp_path / f"{LONG}.jsonl")}}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(llama[0], tmp_path / LONG if where == "tuned" else llama[1], **sections)))
    _one_line(CliRunner().invoke(main, ["run", str(recipe)]), "File name too long")


def test_a_cache_that_is_a_file(llama, write_recipe, tmp_path):
    (tmp_path / "cache").write_text("not a folder")
    result = CliRunner(env={"SURGEON_CACHE": str(tmp_path / "cache")}).invoke(main, ["run", str(write_recipe(*llama))])
    _one_line(result, "cache must be a folder", str(tmp_path / "cache"))


@pytest.mark.skipif(__import__("torch").backends.mps.is_available(), reason="this machine has an Apple GPU")
def test_a_device_this_torch_lacks(llama, write_recipe):
    _one_line(CliRunner().invoke(main, ["run", str(write_recipe(*llama)), "--device", "mps"]), "'mps'", "compute.device")


def test_a_hub_dataset_path_that_climbs_out(llama, write_recipe):
    recipe = write_recipe(*llama, data={"harmful": {"path": "hf://datasets/org/name/../../etc/passwd"}})
    _one_line(CliRunner().invoke(main, ["validate", str(recipe)]), "'..'", "data.harmful")


def test_a_recipe_that_is_a_pipe_is_refused_not_waited_on(tmp_path):
    path = tmp_path / "recipe.yaml"
    os.mkfifo(path)
    _one_line(CliRunner().invoke(main, ["validate", str(path)]), "a recipe is a regular file")
