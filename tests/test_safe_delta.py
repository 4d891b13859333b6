"""safe_delta against a straightforward in-memory computation of its formula: the Gram matrices of
every decoder linear layer's inputs from the whole base model's own forward (hooks, padding left
out), then per weight the budgeted choice of deltas and the column-by-column compensation written
plainly (a full inverse, entries ranked by a Python sort)."""

import pytest
import torch

from surgeon.methods.safe_delta.run import safe_delta
from surgeon.pipeline import run
from surgeon.recipe import load_recipe
from surgeon.tiny import HARMFUL
from tests.reference import checkpoint_tensors, linear_input_sums


def reference(base: torch.Tensor, tuned: torch.Tensor, h: torch.Tensor, scale: float) -> torch.Tensor:
    """The authors' adjustment for a weight of at most 2,048 columns (one block), written plainly."""
    weight, target = base.double().clone(), tuned.double()
    rows, columns = weight.shape
    h = h.double().clone()
    for j in range(columns):
        if h[j, j] == 0:
            h[j, j] = 1
    h += 0.01 * torch.diag(h).mean() * torch.eye(columns, dtype=torch.float64)
    factor = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)  # H^-1 = U^T U
    d = torch.diag(factor)
    sensitivity = [1 / d[j].item() ** 2 for j in range(columns)]
    # entries by their column's sensitivity, least first (ties in row-major order), the most sensitive 15% never taken
    ranked = sorted(range(rows * columns), key=lambda e: (sensitivity[e % columns], e))
    ranked = ranked[: len(ranked) - int(0.15 * len(ranked))]
    budget = sum(sensitivity) / columns * scale / 2 * rows / 4096
    take, spent = torch.zeros(rows, columns, dtype=torch.bool), 0.0
    for e in ranked:
        r, c = divmod(e, columns)
        spent += (target[r, c] - weight[r, c]).item() ** 2 / d[c].item() ** 2
        if spent > budget:
            break
        take[r, c] = True
    for start in range(0, columns, 4):  # four columns at a time, each group's error moving the later columns
        group = slice(start, min(start + 4, columns))
        chosen = torch.where(take[:, group], target[:, group], weight[:, group])
        error = (weight[:, group] - chosen) / d[group]
        weight[:, group.stop:] -= error @ factor[group, group.stop:]
        weight[:, group] = chosen
    return weight.float()


def test_the_formula_equals_its_plain_reading():
    torch.manual_seed(0)
    inputs = torch.randn(300, 48)
    inputs[:, 5] = 0  # a feature no token lights
    h = inputs.T @ inputs
    base = torch.randn(24, 48)
    tuned = base + 0.05 * torch.randn(24, 48)
    for scale in (0.5, 5.0, 50.0):
        got, taken = safe_delta(base, tuned, h, scale)
        want = reference(base, tuned, h, scale)
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), scale
        assert 0 < taken < 24 * 48
    # no budget: nothing taken, nothing to compensate: base exactly
    assert torch.equal(safe_delta(base, tuned, h, 1e-12)[0], base)


def test_safe_delta_through_surgeon_run_equals_the_in_memory_computation(llama_fp32, write_recipe, tmp_path):
    recipe = write_recipe(*llama_fp32, name="safe_delta.yaml", method="safe_delta", safe_delta={"scale": 20.0},
                          output={"path": str(tmp_path / "safe_delta")})
    report = run(load_recipe(recipe)).dump()
    out = checkpoint_tensors(tmp_path / "safe_delta")
    base, tuned = checkpoint_tensors(llama_fp32[0]), checkpoint_tensors(llama_fp32[1])

    grams = linear_input_sums(llama_fp32[0], HARMFUL, lambda x: x.T @ x)
    names = list(grams)

    for name in out:
        if name in grams:
            want = reference(base[name], tuned[name], grams[name], 20.0)
            assert torch.allclose(out[name], want, atol=1e-4, rtol=1e-3), name
        else:  # embeddings, norms, the head: tuned's, bit-exact
            assert torch.equal(out[name], tuned[name]), name
    assert report["method"] == "safe_delta" and report["changed"]["tensors"] == len(names)
    assert report["settings"]["scale"] == 20.0 and report["settings"]["harmful_prompts"] == len(HARMFUL)
    assert "Safe Delta" in (tmp_path / "safe_delta" / "README.md").read_text()


def test_safe_delta_needs_harmful_prompts(llama, tmp_path):
    from surgeon.errors import RecipeValidationError

    path = tmp_path / "r.yaml"
    path.write_text(f"method: safe_delta\nbase: {llama[0]}\ntuned: {llama[1]}\n")
    with pytest.raises(RecipeValidationError, match="needs 'data'"):
        load_recipe(path)
