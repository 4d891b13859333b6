"""The recipes the project ships parse against the schema and name files that ship with them."""

from pathlib import Path

import pytest

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
