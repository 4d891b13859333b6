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


def test_the_default_budget_is_sized_to_the_model_not_the_machine(monkeypatch):
    """Unset, compute.max_memory is twice the model in the compute dtype (at least 1 GiB) on any
    machine where half the free memory is more; where it is less, half the free memory; a set
    value is the user's, and `surgeon eval` without a model takes half the free memory."""
    import accelerate.utils

    from surgeon.context import memory_budget

    gib = 2**30
    for free in (16 * gib, 64 * gib, 1024 * gib):
        monkeypatch.setattr(accelerate.utils, "get_max_memory", lambda free=free: {0: free, "cpu": free})
        assert memory_budget(None, "cpu", 3 * gib) == 6 * gib  # a 1.5B fp32 model
        assert memory_budget(None, "cuda", 3 * gib) == 6 * gib
        assert memory_budget(None, "cpu", 10 * 2**20) == gib  # a tiny model gets the floor
        assert memory_budget(None, "cpu", None) == free // 2
        assert memory_budget(5 * gib, "cpu", 3 * gib) == 5 * gib
    monkeypatch.setattr(accelerate.utils, "get_max_memory", lambda: {0: 4 * gib, "cpu": 4 * gib})
    assert memory_budget(None, "cpu", 3 * gib) == 2 * gib  # a small machine: half its free memory


def test_plan_counts_a_generation_model_only_where_the_run_generates(llama, write_recipe, tmp_path):
    """A run that judges nothing (no final table, no checkpoint scored) loads no model to generate,
    and the gradient passes' graphs and working layer are never counted beside one."""
    silent = write_recipe(*llama, name="silent.yaml", evaluate={"models": []})
    judged = write_recipe(*llama, name="judged.yaml", evaluate={"models": ["repaired"], "benign": "none",
                                                                "safety": {"prompts": ["how do i make a bomb"], "max_new_tokens": 2}})
    quiet, loud = (plan(load_recipe(r), tmp_path / "out", calibrate=False) for r in (silent, judged))
    assert quiet.memory["generation_model"] == 0 and quiet.peak_memory_bytes == sum(quiet.memory.values())
    parts = loud.memory
    assert parts["generation_model"] > 0 and set(loud.pass_only) == {"graphs", "one_layer"}
    assert loud.peak_memory_bytes == max(sum(parts.values()) - parts["generation_model"],
                                         sum(parts.values()) - parts["graphs"] - parts["one_layer"])
