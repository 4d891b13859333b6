"""A method from outside surgeon: one class, one registration, then `surgeon run` writes, evaluates,
reports and cards it like the built-in ones, with its own record and sections, and `surgeon plan`
adds its own estimate, with no edit to the CLI, the pipeline, the report or the card."""

import json
import math

import pytest
import torch
import yaml
from click.testing import CliRunner
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file

from surgeon.cli import main
from surgeon.methods.interface import Repair
from surgeon.methods.registry import MethodSpec, register, unregister
from surgeon.plan import Estimate
from surgeon.records import MethodRecord


class MidpointSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    weight: float = Field(default=0.5, ge=0.0, le=1.0)


class MidpointRecord(MethodRecord):
    moved: int  # tensors moved toward base

    def report_sections(self, run):
        return ["## Midpoint", "", f"{self.moved} tensors moved toward base.", ""]

    def card_sections(self, run):
        return [f"Midpoint moved {self.moved} tensors.", ""]


def midpoint_estimate(recipe, inputs, pair):
    tensors = inputs.tuned.tensors
    largest = max(math.prod(tensors.shape(n)) * tensors.dtype(n).itemsize for n in tensors.names())
    return Estimate(memory={"one_tensor_each_side": 3 * largest}, lines=["midpoint holds one tensor of base, tuned and the output at a time"])


class Midpoint:
    """tuned + weight x (base - tuned) on every decoder tensor below the probe layer."""

    def __init__(self, context):
        self.context = context
        self.weight = context.recipe.midpoint.weight if context.recipe.midpoint else 0.5
        self.names = {n for layer in context.pair.layout.layer_tensors[: context.probe_layer] for n in layer}

    def get(self, name):
        tuned = self.context.pair.tuned.tensors.get(name)
        if name not in self.names:
            return tuned
        return tuned + self.weight * (self.context.pair.base.tensors.get(name) - tuned)

    def run(self):
        return Repair(f"decoder layers below {self.context.probe_layer} moved {self.weight} of the way to base",
                      {"weight": self.weight}, self.context.share_of_decoder(self.names), tensors=self.get,
                      record=MidpointRecord(moved=len(self.names)))


@pytest.fixture
def midpoint():
    register(MethodSpec("midpoint", Midpoint, "tuned moved part of the way to base", settings=MidpointSettings,
                        citation="a toy method of the tests", record=MidpointRecord, plan=midpoint_estimate))
    yield
    unregister("midpoint")


def _tensors(folder):
    return {k: v for f in sorted(folder.glob("model*.safetensors")) for k, v in load_file(f).items()}


def test_a_registered_method_runs_through_surgeon_run(midpoint, llama, tmp_path, task_eval_file):
    base, tuned = llama
    recipe = tmp_path / "midpoint.yaml"
    recipe.write_text(yaml.safe_dump({
        "method": "midpoint", "base": str(base), "tuned": str(tuned), "midpoint": {"weight": 0.25}, "probe": {"layer": 2},
        "evaluate": {"safety": "none", "benign": "none", "task": {"path": str(task_eval_file), "metric": "loss"}}, "compute": {"device": "cpu"},
        "output": {"path": str(tmp_path / "out")},
    }))
    result = CliRunner().invoke(main, ["run", str(recipe), "-q"])
    assert result.exit_code == 0, result.output
    out, b, t = _tensors(tmp_path / "out"), _tensors(base), _tensors(tuned)
    for name, value in out.items():
        below = name.startswith("model.layers.") and int(name.split(".")[2]) < 2
        assert torch.equal(value, t[name] + 0.25 * (b[name] - t[name]) if below else t[name]), name
    report = json.loads((tmp_path / "out" / "surgeon.json").read_text())
    assert report["method"] == "midpoint" and report["settings"]["weight"] == 0.25
    assert report["changed"]["share_of_N"] == pytest.approx(2 / 6)
    models = report["evaluation"]["models"]
    assert set(models) == {"base", "tuned", "repaired"} and models["repaired"]["task_score"] != models["tuned"]["task_score"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "**midpoint**" in card and "a toy method of the tests" in card and "moved 0.25 of the way to base" in card
    assert "## Midpoint\n\n18 tensors moved toward base." in (tmp_path / "out" / "report.md").read_text()
    assert "Midpoint moved 18 tensors." in card and report["record"] == {"moved": 18}
    assert not (tmp_path / "out" / "masks.safetensors").exists()
    planned = CliRunner().invoke(main, ["plan", str(recipe), "-q"])
    assert planned.exit_code == 0, planned.output
    assert "midpoint holds one tensor of base, tuned and the output at a time" in planned.output and "one tensor each side" in planned.output


def test_a_registered_methods_section_is_strict(midpoint, tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("method: midpoint\nbase: a\ntuned: b\nmidpoint: {wieght: 0.3}\n")
    result = CliRunner().invoke(main, ["validate", str(recipe)])
    assert result.exit_code == 2
    assert "unknown key 'midpoint.wieght'; did you mean 'weight'?" in result.output and "typo.yaml:4" in result.output


def test_an_unregistered_method_is_named_with_the_closest(tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("method: resotre\nbase: a\ntuned: b\n")
    result = CliRunner().invoke(main, ["validate", str(recipe)])
    assert result.exit_code == 2 and "unknown method 'resotre'; did you mean 'restore'?" in result.output
