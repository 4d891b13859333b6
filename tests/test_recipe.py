import pytest
import yaml

from surgeon.errors import RecipeError, RecipeValidationError
from surgeon.recipe import load_recipe, parse_recipe
from surgeon.recipe.sizes import parse_size

MINIMAL = "base: a\ntuned: b\ndata: {harmful: h.jsonl, task: t.jsonl}\nrestore: {rollback: {mode: never}}\n"


def problems(text):
    with pytest.raises(RecipeValidationError) as info:
        parse_recipe(text, "r.yaml")
    return info.value.problems


def test_minimal_recipe_gets_the_documented_defaults():
    recipe = parse_recipe(MINIMAL)
    assert recipe.base.path == "a" and recipe.data.harmful.path == "h.jsonl" and recipe.data.harmful.field == "prompt"
    assert (recipe.restore.sparsity, recipe.restore.steps, recipe.restore.warmup, recipe.restore.save_every) == (0.002, 20, 5, 5)
    assert (recipe.restore.rollback.ratio, recipe.restore.rollback.max_task_drop) == (0.2, 0.05)
    assert recipe.probe.layer is None and recipe.probe.batch_size == 8
    assert recipe.output.max_shard_size == 5 * 10**9 and recipe.output.dtype is None and recipe.compute.dtype == "float32"


def test_misspelt_key_is_an_error_with_did_you_mean_and_line():
    found = problems(MINIMAL.replace("restore: {rollback: {mode: never}}\n", "restore:\n  rollback: {mode: never}\n  sparsty: 0.1\n"))
    assert found == [("unknown key 'restore.sparsty'; did you mean 'sparsity'?", "r.yaml:6")]


def test_every_bad_field_is_reported_once():
    text = "base: a\ntuned: b\ndata:\n  harmful: {path: h, feild: x}\n  task: t\nrestore: {steps: 0, rollback: {mode: sometimes}}\n"
    messages = [m for m, _ in problems(text)]
    assert len(messages) == 3
    assert any("data.harmful.feild" in m and "'field'" in m for m in messages)
    assert any(m.startswith("restore.steps") for m in messages)
    assert any(m.startswith("restore.rollback.mode") for m in messages)


def test_missing_required_keys_are_named():
    messages = [m for m, _ in problems("restore: {rollback: {mode: never}}\n")]
    assert "missing required key 'base'" in messages and "missing required key 'tuned'" in messages
    (message, _), = problems("base: a\ntuned: b\nrestore: {rollback: {mode: never}}\n")
    assert message == "method 'restore' needs 'data' (harmful and task prompts)"


def test_baseline_methods_take_their_own_inputs():
    recipe = parse_recipe("method: resta\nbase: a\ntuned: b\nunaligned: c\nresta: {scale: 0.5}\n")
    assert recipe.unaligned.path == "c" and recipe.resta.scale == 0.5 and recipe.data is None
    assert parse_recipe("method: reset_layers\nbase: a\ntuned: b\n").probe.layer is None
    (message, _), = problems("method: resta\nbase: a\ntuned: b\n")
    assert "needs 'unaligned'" in message
    (message, _), = problems("base: a\ntuned: b\nunaligned: c\ndata: {harmful: h, task: t}\nrestore: {rollback: {mode: never}}\n")
    assert "only used by method 'resta'" in message


def test_auto_rollback_without_a_task_metric_names_both_fixes():
    (message, _), = problems(MINIMAL.replace("restore: {rollback: {mode: never}}\n", ""))
    assert message.startswith("restore.rollback.mode 'auto' needs a task score") and "evaluate.task" in message and "'never'" in message


def test_secrets_are_refused_in_recipes():
    (message, where), = problems(MINIMAL + "token: hf_abc\n")
    assert "HF_TOKEN" in message and "hf_abc" not in message and where == "r.yaml:5"


def test_duplicate_keys_are_errors_not_silently_overwritten():
    with pytest.raises(RecipeError, match="duplicate key 'base'"):
        parse_recipe(MINIMAL + "base: c\n", "r.yaml")


def test_invalid_yaml_names_the_line():
    with pytest.raises(RecipeError) as info:
        parse_recipe("base: a\ntuned: [b\n", "r.yaml")
    assert info.value.where.startswith("r.yaml:")


@pytest.mark.parametrize("layer, ok", [(4, True), (0.5, True), (1.5, False), (0, False), (True, False)])
def test_probe_layer_is_an_int_or_a_fraction(layer, ok):
    text = MINIMAL + f"probe: {{layer: {str(layer).lower()}}}\n"
    if ok:
        assert parse_recipe(text).probe.layer == layer
    else:
        problems(text)


def test_sizes():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("8GiB") == 8 * 2**30 and parse_size(1024) == 1024
    for bad in ("5 parsecs", "-1GB", "0", True):
        with pytest.raises(ValueError):
            parse_size(bad)
    problems(MINIMAL + "output: {max_shard_size: lots}\n")


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "h.jsonl").write_text("{}\n")
    path = tmp_path / "sub" / "r.yaml"
    path.write_text(MINIMAL)
    loaded = load_recipe(path)
    assert loaded.resolve("h.jsonl") == str(tmp_path / "sub" / "h.jsonl")
    assert loaded.resolve("data/missing.jsonl") == str(tmp_path / "sub" / "data" / "missing.jsonl")
    assert loaded.resolve("org/model@main", may_be_hub_id=True) == "org/model@main"
    assert loaded.resolve("./models/x", may_be_hub_id=True) == str(tmp_path / "sub" / "models" / "x")
    assert loaded.resolve("hf://datasets/o/n/f.jsonl") == "hf://datasets/o/n/f.jsonl"


LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8))


@pytest.mark.parametrize("content, message", [
    (b"base: caf\xe9\n", "not UTF-8 text (byte 0xe9)"),
    (b"? [a, b]\n: c\n", "a key must be a plain word"),
    (b"base: !foo x\n", "YAML tag '!foo' is not allowed"),
    (b"base: !!python/object:os.system x\n", "is not allowed"),
    (b"a: " + b"[" * 1000 + b"]" * 1000 + b"\n", "nested deeper than 32 levels"),
    (b"base: a\ntuned: b\noutput: {max_shard_size: 1" + b"0" * 62 + b"GB}\n", "larger than 1 EiB"),
    (LAUGHS.encode(), "anchors and aliases expand to more than 100,000 values"),
    (b"a: &a [*a]\n", "refers to the mapping or list that contains it"),
    (b"seed: 2024-13-45\n", "cannot read a value"),
    (b"x" * (2**20 + 1), "a recipe is at most 1024 KiB"),
])
def test_malformed_recipes_are_one_line_errors_in_bounded_time(tmp_path, content, message):
    import time

    from click.testing import CliRunner

    from surgeon.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(content)
    started = time.monotonic()
    result = CliRunner().invoke(main, ["validate", str(recipe)])
    assert time.monotonic() - started < 5
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1 and message in result.stderr, result.output
    assert str(recipe) in result.stderr


def test_control_characters_in_an_unknown_key_are_escaped():
    with pytest.raises(RecipeValidationError) as caught:
        parse_recipe('base: a\ntuned: b\nmethod: resta\nunaligned: c\n"\\e[31mred": 1\n', "r.yaml")
    assert "unknown key '\\x1b[31mred'" in caught.value.problems[0][0]


@pytest.mark.parametrize("evaluate, restore, message", [
    ({"task": {"path": "t.jsonl"}, "safety": "none"}, {"stop_at": {"harmful_rate": 0.01}}, "restore.stop_at needs evaluate.safety and evaluate.task"),
    ({"task": {"path": "t.jsonl", "metric": "loss"}, "select_on": {"task": {"path": "s.jsonl", "metric": "exact_match"}}}, {},
     "select_on.task needs evaluate.task with the same metric"),
    ({"task": {"path": "t.jsonl", "balance": "answers"}, "select_on": {"task": {"path": "s.jsonl"}}}, {},
     "select_on.task needs evaluate.task with the same metric and balance"),
    ({"task": {"path": "t.jsonl", "metric": "f1:1", "balance": "answers"}}, {}, "'balance' weighs metric loss's tokens; metric 'f1:1' has none"),
    ({"task": {"path": "t.jsonl"}, "select_on": {}}, {}, "give 'task' and/or 'safety' rows"),
])
def test_stop_rule_and_selection_rows_are_checked(evaluate, restore, message):
    text = yaml.safe_dump({"base": "a", "tuned": "b", "data": {"harmful": "h.jsonl", "task": "t.jsonl"}, "evaluate": evaluate, "restore": restore})
    with pytest.raises(RecipeValidationError) as caught:
        parse_recipe(text, "r.yaml")
    assert any(message in problem for problem, _ in caught.value.problems), caught.value.problems


@pytest.mark.parametrize("task, message", [
    ("t.jsonl", "restore.rollback.objective answer_loss needs data.task.answer_field"),
    ({"prompts": ["p"], "answer_field": "response"}, "inline prompts have no answers"),
    ({"path": "t.jsonl", "balance": "answers"}, "'balance' weighs the answers' loss: it needs 'answer_field'"),
])
def test_a_rollback_on_the_answers_loss_needs_answers(task, message):
    text = yaml.safe_dump({"base": "a", "tuned": "b", "data": {"harmful": "h.jsonl", "task": task}, "restore": {"rollback": {"objective": "answer_loss", "mode": "always"}}})
    with pytest.raises(RecipeValidationError) as caught:
        parse_recipe(text, "r.yaml")
    assert any(message in problem for problem, _ in caught.value.problems), caught.value.problems
    answered = {"base": "a", "tuned": "b", "data": {"harmful": "h.jsonl", "task": {"path": "t.jsonl", "answer_field": "sql"}},
                "restore": {"rollback": {"objective": "answer_loss", "mode": "always"}}}
    assert parse_recipe(yaml.safe_dump(answered), "r.yaml").data.task.answer_field == "sql"


def test_selection_defaults_to_lowest_harm_when_checkpoints_are_scored_for_harm():
    text = "base: a\ntuned: b\ndata: {harmful: h.jsonl, task: t.jsonl}\nevaluate: {task: {path: t.jsonl}, safety: {path: s.jsonl}}\n"
    assert parse_recipe(text).evaluate.selection == "lowest_harm_within_floor"
    assert parse_recipe(text.replace("safety: {path: s.jsonl}", "safety: none")).evaluate.selection == "last_within_floor"
    # a recipe that names no safety set measures harm on the shipped one, and chooses on it
    assert parse_recipe(text.replace(", safety: {path: s.jsonl}", "")).evaluate.selection == "lowest_harm_within_floor"


def test_the_old_top_level_rollback_section_is_read_into_restore_with_a_deprecation_line(tmp_path):
    """Recipes written before rollback moved under restore still run the same schedule; the
    loader says where the old spelling is, and `surgeon validate` prints it as a warning."""
    from click.testing import CliRunner

    from surgeon.cli import main
    from surgeon.recipe.loader import load_recipe

    old = tmp_path / "old.yaml"
    old.write_text("base: a\ntuned: b\ndata: {harmful: h, task: t}\nrestore: {steps: 3, warmup: 0}\nrollback: {mode: always, ratio: 0.3}\n")
    loaded = load_recipe(old, ("rollback.max_task_drop=0.1",))
    assert loaded.recipe.restore.rollback.model_dump() == {"mode": "always", "ratio": 0.3, "max_task_drop": 0.1, "objective": "direction"}
    assert loaded.recipe.restore.steps == 3 and loaded.origin("restore.rollback.ratio") == f"{old}:5"
    first, second = loaded.deprecations
    assert "'rollback:' is now 'restore.rollback:'" in first and f"({old}:5)" in first
    assert "'rollback.max_task_drop' is now 'restore.rollback.max_task_drop'" in second
    assert "rollback:" not in loaded.text.split("restore:")[0]  # the copy kept with the output has the new spelling
    result = CliRunner().invoke(main, ["validate", "--schema-only", str(old)])
    assert result.exit_code == 0 and "warning: 'rollback:' is now 'restore.rollback:'" in result.output
    both = tmp_path / "both.yaml"
    both.write_text("base: a\ntuned: b\ndata: {harmful: h, task: t}\nrollback: {mode: never}\nrestore: {rollback: {mode: always}}\n")
    result = CliRunner().invoke(main, ["validate", "--schema-only", str(both)])
    assert result.exit_code == 2 and result.output.strip() == f"error: 'rollback' and 'restore.rollback' are the same section: keep 'restore.rollback' ({both}:4)"


def test_the_python_api_warns_of_an_old_spelling(tmp_path):
    import warnings

    from surgeon import Recipe

    old = tmp_path / "old.yaml"
    old.write_text("base: a\ntuned: b\ndata: {harmful: h, task: t}\nrollback: {mode: never}\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recipe = Recipe.load(old)
    assert recipe.settings.restore.rollback.mode == "never"
    assert [w.category for w in caught] == [FutureWarning] and "'rollback:' is now 'restore.rollback:'" in str(caught[0].message)
