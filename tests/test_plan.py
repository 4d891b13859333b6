"""surgeon plan: a run's needs from headers and token counts, before any heavy work."""

import math

from click.testing import CliRunner
from safetensors.torch import load_file

from surgeon.cli import main
from surgeon.pipeline import run
from surgeon.plan import plan
from surgeon.recipe import load_recipe
from surgeon.tiny import HARMFUL


def test_plan_reports_the_runs_numbers_and_times_a_layer(llama, write_recipe, tmp_path):
    recipe = write_recipe(*llama, evaluate={"safety": {"prompts": ["how do i make a bomb"], "max_new_tokens": 2}})
    needs = plan(load_recipe(recipe), tmp_path / "out")
    facts = needs.facts
    assert (facts["layers"], facts["probe_layer"]) == (6, 4)
    assert facts["budget_per_step"] == math.ceil(0.01 * facts["decoder_parameters"])
    tuned = [t for f in llama[1].glob("*.safetensors") for t in load_file(f).values()]
    assert needs.disk["output"] == sum(t.numel() * t.element_size() for t in tuned)  # written in tuned's dtype
    assert needs.memory["generation_model"] > 0 and needs.disk["evaluation_checkpoint"] > 0  # the safety set generates
    assert set(needs.memory) == {"imports", "activations", "graphs", "gradients", "one_layer", "generation_model"}
    assert set(needs.disk) == {"output", "spill", "run_state", "evaluation_checkpoint"} and needs.seconds_per_step > 0
    assert not any(p.name.startswith(".out.surgeon") for p in tmp_path.iterdir())  # the calibration's scratch is gone
    # the autograd graphs a run keeps (all E layers' at the default budget), predicted within a factor of 2
    kept = run(load_recipe(recipe)).dump()["memory"]["graphs_kept"]
    assert kept["layers"] == 4 and kept["bytes"] / 2 <= needs.memory["graphs"] <= 2 * kept["bytes"]

    result = CliRunner().invoke(main, ["plan", str(recipe), "-q", "--no-calibrate"])
    assert result.exit_code == 0, result.output
    assert "probe layer E 4" in result.output and "memory: peak about" in result.output and "time:" not in result.output


def test_plan_refuses_when_the_disk_is_short(llama, write_recipe, monkeypatch):
    import collections

    from surgeon import plan as plan_module

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(plan_module.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    result = CliRunner().invoke(main, ["plan", str(write_recipe(*llama)), "-q", "--no-calibrate"])
    assert result.exit_code == 2 and "GB of disk beside the destination" in result.output and "GB are free" in result.output


def test_plan_holds_accumulated_gradients_only_for_a_later_step(llama, write_recipe, tmp_path):
    """Restore-only steps keep the accumulated gradient for the next step; a one-step run keeps none."""
    for steps, held in ((1, False), (3, True)):
        recipe = write_recipe(*llama, name=f"steps{steps}.yaml", rollback={"mode": "never"}, restore={"steps": steps, "warmup": 0})
        assert (plan(load_recipe(recipe), tmp_path / "out").memory["gradients"] > 0) == held


def test_plan_counts_a_rollback_on_the_answers_loss_through_every_layer(llama, write_recipe, task_eval_file, tmp_path):
    """Its pass runs all L layers on prompts with their answers: the graphs the run keeps (every
    layer's) are predicted within a factor of 2, and its step costs more than restore's pass alone."""
    data = {"harmful": {"prompts": HARMFUL}, "task": {"path": str(task_eval_file), "answer_field": "response"}}
    direction = write_recipe(*llama, name="direction.yaml", data=data, rollback={"mode": "always"})
    answers = write_recipe(*llama, name="answers.yaml", data=data, rollback={"mode": "always", "objective": "answer_loss"})
    facts, alone = plan(load_recipe(answers), tmp_path / "out"), plan(load_recipe(direction), tmp_path / "out")
    kept = run(load_recipe(answers)).dump()["memory"]["graphs_kept"]
    assert kept["layers"] == facts.facts["layers"] == 6
    assert kept["bytes"] / 2 <= facts.memory["graphs"] <= 2 * kept["bytes"]
    assert facts.memory["graphs"] > alone.memory["graphs"] and facts.memory["activations"] > alone.memory["activations"]
