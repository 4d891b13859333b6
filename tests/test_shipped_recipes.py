"""The recipes the project ships parse against the schema and name files that ship with them."""

import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from click.testing import CliRunner

from surgeon.cli import main
from surgeon.recipe.loader import load_recipe

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(ROOT.glob("recipes/*.yaml")) + sorted(ROOT.glob("examples/*/recipe.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_recipe_is_valid(path):
    load_recipe(path)


@pytest.mark.parametrize("path", sorted(ROOT.glob("examples/*/recipe.yaml")), ids=lambda p: p.parent.name)
def test_example_names_only_shipped_files(path):
    """Models under models/ are made by the example's documented step; everything else ships."""
    loaded = load_recipe(path)
    recipe = loaded.recipe
    files = [s.path for s in (recipe.data.harmful, recipe.data.task, recipe.evaluate.safety, recipe.evaluate.task) if s is not None and s.path]
    parts = [part for ref in (recipe.base, recipe.tuned) for part in ref.path.split("+") if not part.startswith("./models/")]
    for relative in files + parts:
        assert Path(loaded.resolve(relative)).exists(), relative


def test_every_shipped_recipe_passes_schema_only_validation():
    for path in sorted(ROOT.glob("recipes/*.yaml")):
        result = CliRunner().invoke(main, ["validate", "--schema-only", str(path)])
        assert result.exit_code == 0 and result.output.endswith("ok (schema only)\n"), (path, result.output)


def test_the_committed_json_schema_is_the_generated_one():
    result = CliRunner().invoke(main, ["schema"])
    assert result.exit_code == 0
    assert json.loads(result.output) == json.loads((ROOT / "recipes" / "recipe.schema.json").read_text()), \
        "recipes/recipe.schema.json is stale: surgeon schema > recipes/recipe.schema.json"


@pytest.mark.parametrize("path", sorted(ROOT.glob("recipes/*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate_against_the_json_schema(path):
    validator = jsonschema.Draft202012Validator(json.loads(CliRunner().invoke(main, ["schema"]).output))
    assert not list(validator.iter_errors(yaml.safe_load(path.read_text())))
    assert path.read_text().startswith("# yaml-language-server: $schema=recipe.schema.json\n") or path.name == "reference.yaml"


def test_the_json_schema_catches_what_the_loader_refuses():
    validator = jsonschema.Draft202012Validator(json.loads(CliRunner().invoke(main, ["schema"]).output))
    assert list(validator.iter_errors({"base": "a", "tuned": "b", "restore": {"sparsity": 2.0}}))
    assert list(validator.iter_errors({"base": "a", "tuned": "b", "retsore": {}}))


def test_a_four_line_recipe_extends_a_shipped_one(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("extends: llama-3.1-8b-instruct\ntuned: ./sql-lora\ndata: {task: ./sql_train.jsonl}\n"
                      "evaluate: {task: {path: ./sql_eval.jsonl, metric: exact_match}}\n")
    result = CliRunner().invoke(main, ["validate", "--schema-only", "--print", str(recipe)])
    assert result.exit_code == 0, result.output
    settings = yaml.safe_load(result.output.rsplit("\n", 2)[0])
    assert settings["base"]["path"] == "meta-llama/Llama-3.1-8B-Instruct" and settings["tuned"]["path"] == "./sql-lora"
    assert settings["data"]["harmful"]["path"] == "surgeon://harmbench_val.jsonl" and settings["data"]["task"]["path"] == "./sql_train.jsonl"
    assert settings["evaluate"]["safety"]["path"] == "surgeon://harmbench_test.jsonl"
    assert settings["evaluate"]["task"] == {**settings["evaluate"]["task"], "path": "./sql_eval.jsonl", "metric": "exact_match"}
    assert (settings["restore"]["sparsity"], settings["restore"]["rollback"]["mode"]) == (0.002, "auto")
    # the copy kept with an output stands alone
    loaded = load_recipe(recipe)
    copy = yaml.safe_load(loaded.text)
    assert "extends" not in copy and copy["base"] == "meta-llama/Llama-3.1-8B-Instruct" and copy["tuned"] == "./sql-lora"


def test_an_error_in_an_extended_recipe_names_its_file_and_line(tmp_path):
    (tmp_path / "team.yaml").write_text("base: org/aligned\nrestore:\n  sparsity: 2.0\n")
    (tmp_path / "mine.yaml").write_text("extends: ./team.yaml\ntuned: b\ndata: {harmful: h, task: t}\nrollback: {mode: never}\n")
    result = CliRunner().invoke(main, ["validate", "--schema-only", str(tmp_path / "mine.yaml")])
    assert result.exit_code == 2 and "restore.sparsity" in result.output and "team.yaml:3" in result.output


@pytest.mark.parametrize("text, message", [
    ("extends: llama-3.1-8b-instrct\ntuned: b\n", "did you mean 'llama-3.1-8b-instruct'?"),
    ("extends: ./loop.yaml\nbase: a\ntuned: b\n", "goes round in a circle"),
    ("extends: [a]\nbase: a\ntuned: b\n", "extends names a shipped recipe or a recipe file"),
    ("extends: ./missing.yaml\nbase: a\ntuned: b\n", "cannot read recipe"),
])
def test_bad_extends_is_one_line(tmp_path, text, message):
    (tmp_path / "loop.yaml").write_text(text)
    result = CliRunner().invoke(main, ["validate", "--schema-only", str(tmp_path / "loop.yaml")])
    assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_a_placeholder_left_in_place_is_named_with_its_field(llama, tmp_path):
    """A user who extends a shipped recipe and forgets `tuned` is told which field still holds the placeholder."""
    recipe = tmp_path / "forgot.yaml"
    recipe.write_text(f"extends: smollm2-1.7b-instruct\nbase: {llama[0]}\n")
    result = CliRunner().invoke(main, ["validate", str(recipe)])
    assert result.exit_code == 2 and "(tuned: " in result.output and "your-fine-tune" in result.output, result.output


def test_shipped_recipes_run_restore_as_the_bench_measures_it(tmp_path):
    """Every recipe a user extends (recipes/) schedules restore (its restore section, rollback
    included) as bench/effectiveness.py measures it as `restore`, so the figures it publishes are of the
    repair that user gets (the demo under examples/ runs a shorter schedule, and says so)."""
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    import effectiveness

    models = {"aligned": "./aligned", "tuned": "./tuned"}
    bench = tmp_path / "bench.yaml"
    bench.write_text(effectiveness.recipe_text("restore", None, models, tmp_path / "out", tmp_path, "sql", tmp_path))
    measured = load_recipe(bench).recipe
    for path in sorted(ROOT.glob("recipes/*.yaml")):
        recipe = load_recipe(path).recipe
        if recipe.method == "restore":
            assert recipe.restore == measured.restore, path.name
