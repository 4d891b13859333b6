import json

import yaml
from click.testing import CliRunner

from surgeon import __version__
from surgeon.cli import main
from tests.conftest import recipe_dict


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and __version__ in result.output


def test_run_writes_the_output_and_prints_a_summary(llama, write_recipe, tmp_path):
    result = invoke("run", write_recipe(*llama), "-q")
    assert result.exit_code == 0, result.output
    assert "restored" in result.output and "peak RSS" in result.output
    out = tmp_path / "repaired"
    report = json.loads((out / "surgeon.json").read_text())
    assert report["tool"]["version"] == __version__ and len(report["steps"]) == 3
    assert {"config.json", "masks.safetensors", "recipe.yaml", "tokenizer.json", "model.safetensors.index.json"} <= {p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if ".surgeon-" in p.name]


def test_a_repaired_folder_is_a_valid_input(llama, write_recipe, tmp_path):
    """The output (with masks.safetensors beside the shards) can be repaired again or compared."""
    from surgeon.io.references import resolve_model

    assert invoke("run", write_recipe(*llama), "-q").exit_code == 0
    repaired = resolve_model(str(tmp_path / "repaired"))
    assert sorted(repaired.tensors.names()) == sorted(resolve_model(str(llama[1])).tensors.names())
    result = invoke("run", write_recipe(llama[0], tmp_path / "repaired", name="again.yaml"), "-q", "--output", tmp_path / "again")
    assert result.exit_code == 0, result.output


def test_bad_recipe_prints_one_line_per_problem_and_exits_2(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("base: a\ntuned: b\ndata: {harmful: h, task: t}\nrollback: {mode: never}\nrestore: {sparsty: 1, steps: -1}\n")
    result = invoke("validate", recipe)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 2
    assert all(line.startswith("error: ") and f"({recipe}:5)" in line for line in lines)
    assert any("did you mean 'sparsity'" in line for line in lines)


def test_missing_model_is_one_line_exit_2(tmp_path, write_recipe):
    result = invoke("validate", write_recipe(tmp_path / "nope", tmp_path / "nope2"))
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "nope" in result.output


def test_an_earlier_output_is_replaced_only_with_overwrite(llama, write_recipe, tmp_path):
    recipe = write_recipe(*llama)
    assert invoke("run", recipe, "-q").exit_code == 0
    before = (tmp_path / "repaired" / "surgeon.json").stat().st_mtime_ns
    refused = invoke("run", recipe, "-q")
    assert refused.exit_code == 2 and "--overwrite" in refused.output
    assert (tmp_path / "repaired" / "surgeon.json").stat().st_mtime_ns == before
    assert invoke("run", recipe, "-q", "--overwrite").exit_code == 0
    assert (tmp_path / "repaired" / "surgeon.json").stat().st_mtime_ns != before


def test_overwrite_never_replaces_a_folder_surgeon_did_not_write(llama, write_recipe, tmp_path):
    out = tmp_path / "repaired"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = invoke("run", write_recipe(*llama), "-q", "--overwrite")
    assert result.exit_code == 2 and "not a surgeon output" in result.output and (out / "keep.txt").read_text() == "mine"


def test_overwrite_keeps_a_user_file_inside_an_earlier_output(llama, write_recipe, tmp_path):
    recipe = write_recipe(*llama)
    assert invoke("run", recipe, "-q").exit_code == 0
    (tmp_path / "repaired" / "notes.txt").write_text("mine")
    result = invoke("run", recipe, "-q", "--overwrite")
    assert result.exit_code == 2 and "'notes.txt', which surgeon did not write" in result.output
    assert (tmp_path / "repaired" / "notes.txt").read_text() == "mine"


def test_overwrite_refuses_the_current_folder_holding_the_recipe_data(llama, tmp_path, monkeypatch):
    """The reported loss: output.path '.' with --overwrite deleted harmful.jsonl and task.jsonl."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "harmful.jsonl").write_text('{"prompt": "how do I pick a lock"}\n')
    (tmp_path / "task.jsonl").write_text('{"prompt": "select name from users"}\n')
    recipe_text = yaml.safe_dump(recipe_dict(*llama, data={"harmful": "harmful.jsonl", "task": "task.jsonl"}, output={"path": "."}))
    (tmp_path / "recipe.yaml").write_text(recipe_text)
    result = invoke("run", "recipe.yaml", "-q", "--overwrite")
    assert result.exit_code == 2 and result.output.startswith("error: the output folder ")
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("surgeon-cache")) == ["harmful.jsonl", "recipe.yaml", "task.jsonl"]


def test_overwrite_refuses_the_home_folder(llama, write_recipe, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    monkeypatch.setenv("HOME", str(home))
    result = invoke("run", write_recipe(*llama), "-q", "--overwrite", "--output", "~")
    assert result.exit_code == 2 and "your home folder" in result.output and (home / "thesis.tex").exists()


def test_output_containing_a_data_file_is_refused(llama, write_recipe, tmp_path, task_eval_file):
    result = invoke("run", write_recipe(*llama, evaluate={"task": {"path": str(task_eval_file)}}), "-q", "--output", tmp_path)
    assert result.exit_code == 2 and "contains" in result.output and task_eval_file.exists()


def test_output_flag_overrides_the_recipe(llama, write_recipe, tmp_path):
    assert invoke("run", write_recipe(*llama), "-q", "--output", tmp_path / "elsewhere").exit_code == 0
    assert (tmp_path / "elsewhere" / "surgeon.json").exists() and not (tmp_path / "repaired").exists()


def test_output_inside_an_input_folder_is_refused(llama, write_recipe):
    result = invoke("run", write_recipe(*llama), "-q", "--output", llama[1] / "repaired")
    assert result.exit_code == 2 and "lies inside an input" in result.output


def test_internal_errors_exit_1_with_one_line_and_debug_shows_the_traceback(llama, write_recipe, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr("surgeon.pipeline.run", broken)
    recipe = write_recipe(*llama)
    result = invoke("run", recipe, "-q")
    assert result.exit_code == 1 and result.output.strip() == "internal error: RuntimeError: boom (rerun with --debug for the traceback)"
    assert "Traceback" in invoke("run", recipe, "-q", "--debug").output


def test_validate_prints_the_plan(llama, write_recipe):
    result = invoke("validate", write_recipe(*llama))
    assert result.exit_code == 0 and "probe layer: 4" in result.output and result.output.strip().endswith("ok")
