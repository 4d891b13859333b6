"""The other post-hoc repairs (linear, antidote, safe_lora, dg_hard) through `surgeon run`,
each checked against its formula computed here on whole tensors in memory."""

import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from surgeon.engine.masks import MaskSet
from surgeon.methods.posthoc import dg_omega, marchenko_pastur_median
from surgeon.pipeline import run
from surgeon.recipe import load_recipe
from surgeon.tiny import HARMFUL, make_pair
from tests.reference import checkpoint_tensors, linear_input_sums


def _run(write_recipe, base, tuned, tmp_path, method, **sections):
    recipe = write_recipe(base, tuned, name=f"{method}.yaml", method=method, output={"path": str(tmp_path / method)}, **sections)
    report = run(load_recipe(recipe)).dump()
    return report, checkpoint_tensors(tmp_path / method)


def _linear_weights(model) -> list[str]:
    return [f"{name}.weight" for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and ".layers." in name]


def test_linear_is_tuned_plus_alpha_times_the_way_back_to_base(llama_fp32, write_recipe, tmp_path):
    report, out = _run(write_recipe, *llama_fp32, tmp_path, "linear", linear={"alpha": 0.3})
    base, tuned = checkpoint_tensors(llama_fp32[0]), checkpoint_tensors(llama_fp32[1])
    for name, value in out.items():
        want = tuned[name] if torch.equal(base[name], tuned[name]) else tuned[name] + 0.3 * (base[name] - tuned[name])
        assert torch.equal(value, want), name
    changed = [n for n in tuned if not torch.equal(base[n], tuned[n])]
    assert report["method"] == "linear" and report["changed"]["tensors"] == len(changed) > 0
    assert report["settings"]["alpha"] == 0.3
    card = (tmp_path / "linear" / "README.md").read_text()
    assert "Pre- and Post-Tuning Model Merging" in card


def test_antidote_prunes_the_top_of_each_row_by_update_times_input_norm(llama_fp32, write_recipe, tmp_path):
    """Input norms from the whole tuned model's own forward (hooks on its linear layers, padding left out)."""
    report, out = _run(write_recipe, *llama_fp32, tmp_path, "antidote", antidote={"ratio": 0.25})
    base, tuned = checkpoint_tensors(llama_fp32[0]), checkpoint_tensors(llama_fp32[1])
    squares = linear_input_sums(llama_fp32[1], HARMFUL, lambda x: x.pow(2).sum(0))
    names = sorted(squares)

    masks = MaskSet.load(tmp_path / "antidote" / "masks.safetensors")
    assert set(masks.names()) == set(names)
    for name in names:
        update = tuned[name] - base[name]
        score = update.abs() * squares[name].sqrt()
        columns = score.shape[1]
        pruned_per_row = columns - int(columns * 0.75)
        expected = torch.zeros_like(update, dtype=torch.bool)
        for row in range(score.shape[0]):
            ranked = sorted(range(columns), key=lambda c: (score[row, c].item(), c))  # ascending, earlier column first on ties
            for column in ranked[columns - pruned_per_row:]:
                expected[row, column] = update[row, column] != 0
        assert torch.equal(masks.get(name), expected), name
        assert torch.equal(out[name], torch.where(expected, base[name], tuned[name]))
    assert report["changed"]["parameters"] == masks.count() > 0


@pytest.mark.parametrize("select", [{"select": "number", "number": 5}, {"select": "threshold", "threshold": 0.9}])
def test_safe_lora_projects_the_updates_least_like_their_projection(llama_fp32, write_recipe, tmp_path, select):
    unaligned_dir = make_pair(tmp_path / "unaligned", "llama", seed=7, dtype=torch.float32)[0]
    report, out = _run(write_recipe, *llama_fp32, tmp_path, "safe_lora", unaligned=str(unaligned_dir), safe_lora=select)
    base, tuned, unaligned = checkpoint_tensors(llama_fp32[0]), checkpoint_tensors(llama_fp32[1]), checkpoint_tensors(unaligned_dir)
    model = AutoModelForCausalLM.from_pretrained(llama_fp32[1])
    cosines, projections = {}, {}
    for name in _linear_weights(model):
        v = base[name] - unaligned[name]
        projections[name] = v @ v.T / torch.linalg.norm(v)
        update = tuned[name] - base[name]
        cosines[name] = torch.nn.functional.cosine_similarity((projections[name] @ update).reshape(1, -1), update.reshape(1, -1)).item()
    cut = sorted(cosines.values())[4] if select["select"] == "number" else 0.9
    projected = {n for n, c in cosines.items() if c <= cut}
    assert projected and set(report["record"]["projected"]) == projected
    for name, value in out.items():
        want = base[name] + projections[name] @ (tuned[name] - base[name]) if name in projected else tuned[name]
        assert torch.allclose(value, want, atol=1e-6), name
    assert report["changed"]["tensors"] == len(projected)


def test_safe_lora_needs_an_unaligned_model(llama, write_recipe):
    from click.testing import CliRunner

    from surgeon.cli import main

    result = CliRunner().invoke(main, ["validate", str(write_recipe(*llama, method="safe_lora"))])
    assert result.exit_code == 2 and "needs 'unaligned'" in result.output


def test_dg_hard_threshold_matches_gavish_and_donoho():
    """omega(beta) / mu_beta against the paper's constant (2.858 at beta = 1) and its cubic fit."""
    ratio = lambda beta: dg_omega(beta) / marchenko_pastur_median(beta)
    assert dg_omega(1.0) == pytest.approx(4 / math.sqrt(3))
    assert ratio(1.0) == pytest.approx(2.858, abs=2e-3)
    for beta in (0.1, 0.25, 0.5, 0.75):
        assert ratio(beta) == pytest.approx(0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43, abs=0.02)


def test_dg_hard_keeps_a_low_rank_update_and_drops_its_noise(tmp_path, write_recipe):
    """tuned = base + a rank-2 update + small noise on one matrix: the output keeps the rank-2 part."""
    from safetensors.torch import save_file

    base_dir, tuned_dir = make_pair(tmp_path / "pair", "llama", noise=0.0, dtype=torch.float32)
    target = "model.layers.1.mlp.down_proj.weight"
    shard = next(f for f in sorted(tuned_dir.glob("*.safetensors")) if target in load_file(f))
    tensors = load_file(shard)
    torch.manual_seed(0)
    m, n = tensors[target].shape
    signal = (torch.randn(m, 2) * 3) @ torch.randn(2, n)
    tensors[target] = tensors[target] + signal + 0.01 * torch.randn(m, n)
    save_file(tensors, shard, metadata={"format": "pt"})

    report, out = _run(write_recipe, base_dir, tuned_dir, tmp_path, "dg_hard")
    base = checkpoint_tensors(base_dir)
    assert report["record"]["ranks_kept"] == {target: [2, min(m, n)]}
    kept = out[target] - base[target]
    assert torch.linalg.matrix_rank(kept, atol=1e-3) == 2 and torch.allclose(kept, signal, atol=0.05)
    assert all(torch.equal(out[k], v) for k, v in checkpoint_tensors(tuned_dir).items() if k != target)


def test_every_method_is_described_in_the_schema():
    from surgeon.recipe.schema import json_schema

    schema = json_schema()
    for section in ("linear", "antidote", "safe_lora", "dg_hard"):
        assert section in schema["properties"], section
    assert "dense_ratio" in schema["$defs"]["Antidote"]["properties"]["ratio"]["description"]
