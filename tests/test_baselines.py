"""The baselines users compare against: reset_layers and RESTA, streamed and evaluated like a repair."""

import json

import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from surgeon.cli import main
from surgeon.pipeline import run
from surgeon.recipe import load_recipe
from surgeon.tiny import make_pair


def _tensors(folder):
    return {k: v for f in sorted(folder.glob("model*.safetensors")) for k, v in load_file(f).items()}


def _recipe(tmp_path, **fields):
    path = tmp_path / "baseline.yaml"
    evaluate = {"safety": "none", "benign": "none", **fields.pop("evaluate", {})}  # harm off unless a test measures it
    path.write_text(yaml.safe_dump({**fields, "evaluate": evaluate, "compute": {"device": "cpu"},
                                    "output": {"path": str(tmp_path / "out"), "max_shard_size": "40KB"}}))
    return load_recipe(path)


def test_reset_layers_copies_whole_layers_below_e(llama, tmp_path, task_eval_file):
    base, tuned = llama
    report = run(_recipe(tmp_path, method="reset_layers", base=str(base), tuned=str(tuned), probe={"layer": 4},
                         evaluate={"task": {"path": str(task_eval_file), "metric": "loss"}})).dump()
    out, b, t = _tensors(tmp_path / "out"), _tensors(base), _tensors(tuned)
    for name, value in out.items():
        below = name.startswith("model.layers.") and int(name.split(".")[2]) < 4
        assert torch.equal(value, b[name] if below else t[name]), name
    norm = "model.layers.0.input_layernorm.weight"
    assert not torch.equal(b[norm], t[norm])  # so the loop above shows norms are copied too
    assert report["method"] == "reset_layers" and report["changed"]["share_of_N"] == 4 / 6
    models = report["evaluation"]["models"]
    # the written model is base in layers < 4: its loss lies apart from tuned's
    assert models["repaired"]["task_score"] != models["tuned"]["task_score"]
    assert "copied whole from base" in (tmp_path / "out" / "README.md").read_text()
    assert "reset_layers" in (tmp_path / "out" / "report.md").read_text()


def test_resta_adds_the_safety_vector_where_base_and_unaligned_differ(llama, tmp_path, task_eval_file):
    base, tuned = llama
    _, unaligned = make_pair(tmp_path / "unaligned", "llama", noise=0.02, seed=0)
    # 'unaligned' differs from base in decoder layers only: both branches of RESTA are exercised
    u = _tensors(unaligned)
    b = _tensors(base)
    assert torch.equal(u["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    report = run(_recipe(tmp_path, method="resta", base=str(base), tuned=str(tuned), unaligned=str(unaligned), resta={"scale": 0.5},
                         evaluate={"task": {"path": str(task_eval_file), "metric": "kl"}})).dump()
    out, t = _tensors(tmp_path / "out"), _tensors(tuned)
    for name, value in out.items():
        if torch.equal(b[name], u[name]):
            assert torch.equal(value, t[name]), name
        else:
            assert torch.equal(value, (t[name].float() + 0.5 * (b[name].float() - u[name].float())).to(t[name].dtype)), name
    changed = [n for n in out if not torch.equal(b[n], u[n])]
    assert report["changed"]["tensors"] == len(changed) > 0
    models = report["evaluation"]["models"]
    assert abs(models["tuned"]["task_score"]) < 1e-6 and models["repaired"]["task_score"] > 0
    assert report["inputs"]["unaligned"]["reference"] == f"./{unaligned.name}" and report["inputs"]["unaligned"]["local"]


def test_baseline_run_on_the_command_line(llama, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"method": "reset_layers", "base": str(llama[0]), "tuned": str(llama[1]), "evaluate": {"safety": "none", "benign": "none"},
                                  "compute": {"device": "cpu"}, "output": {"path": str(tmp_path / "out")}}))
    result = CliRunner().invoke(main, ["run", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "reset_layers: decoder layers below 4 of 6 copied whole from base" in result.output
