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
    assert report["tool"]["version"] == __version__ and len(report["record"]["steps"]) == 3
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
    recipe.write_text("base: a\ntuned: b\ndata: {harmful: h, task: t}\nrestore: {rollback: {mode: never}, sparsty: 1, steps: -1}\n")
    result = invoke("validate", recipe)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 2
    assert all(line.startswith("error: ") and f"({recipe}:4)" in line for line in lines)
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


def test_usage_errors_are_one_error_line(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = [("validate", tmp_path), ("run", "--bogus", "r.yaml"), ("run",), ("eval",), ("push", tmp_path / "missing", "--repo-id", "a/b")]
    for args in cases:
        result = invoke(*args)
        assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: "), (args, result.output)
    assert "Is a directory" in invoke("validate", tmp_path).stderr


def test_output_onto_a_file_is_one_error_line(llama, write_recipe, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    result = invoke("run", write_recipe(*llama), "-q", "-o", a_file)
    assert result.exit_code == 2 and result.stderr == f"error: output path exists and is a file ({a_file})\n" and a_file.read_text() == "x"


def test_a_run_logged_to_a_file_prints_timestamped_lines_and_whole_tables(llama, write_recipe, task_eval_file):
    import re

    result = invoke("run", write_recipe(*llama, evaluate={"task": {"path": str(task_eval_file)}, "safety": {"prompts": ["how do I pick a lock"]}}))
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert len(lines) > 10 and all(re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", line) for line in lines)
    assert any("writing shards: done" in line for line in lines)
    assert "…" not in result.stdout and re.search(r"\d+\.\d%", result.stdout)


def test_log_progress_never_goes_quiet_inside_a_long_step():
    import io
    import time

    from surgeon.console import LogProgress

    stream = io.StringIO()
    with LogProgress(stream, interval=0.2) as progress, progress.task("generating", total=2) as task:
        task.detail("token 7/128 of this batch")
        time.sleep(1.3)
        task.advance()
    lines = stream.getvalue().splitlines()
    beats = [line for line in lines if "generating: 0/2, token 7/128 of this batch" in line]
    assert len(beats) >= 4, lines
    assert lines[0].endswith("generating: started, 2 to do") and "generating: done 1/2 in" in lines[-1]


def test_published_records_name_no_local_path(llama, write_recipe, task_eval_file, tmp_path):
    recipe = write_recipe(*llama, evaluate={"task": {"path": str(task_eval_file)}})
    assert invoke("run", recipe, "-q").exit_code == 0
    card = (tmp_path / "repaired" / "README.md").read_text()
    record = (tmp_path / "repaired" / "surgeon.json").read_text()
    private = {str(tmp_path), str(llama[0].parent), str(llama[0].parent.parent)}
    for text in (card, record):
        assert not any(path in text for path in private)
    assert "pip install alignment-surgeon" in card or "pip install ." in card
    assert "pip install surgeon" not in card
    inputs = json.loads(record)["inputs"]
    assert inputs["base"]["reference"] == "./llama-base" and inputs["base"]["local"]["./llama-base"].startswith("sha256:")
    assert inputs["evaluate.task"]["reference"] == "./task_eval.jsonl"
    shown = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert shown["base"] == "./llama-base" and shown["tuned"] == "./llama-tuned" and shown["output"]["path"] == "./repaired"
    assert shown["evaluate"]["task"]["path"] == "./task_eval.jsonl"
    assert "- `./llama-base` (base): sha256:" in card
