"""Recipe parsing: schema and loading. Knows nothing of torch."""

from surgeon.recipe.loader import LoadedRecipe, load_recipe, parse_recipe
from surgeon.recipe.schema import Recipe

__all__ = ["LoadedRecipe", "Recipe", "load_recipe", "parse_recipe"]
