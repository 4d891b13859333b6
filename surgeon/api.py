"""surgeon from Python: the functions the command line calls, for notebooks and training scripts.

    import surgeon

    recipe = surgeon.Recipe.load("recipe.yaml", {"restore.steps": 10})
    result = surgeon.repair(recipe, output="./repaired", overwrite=True)
    print(result.output, result.chosen_step, result.scores["repaired"].harmful_rate)
    table = surgeon.evaluate(["base", "tuned", str(result.output)], recipe=recipe)

Errors are `surgeon.errors.SurgeonError`s, the same one-line messages the CLI prints. Nothing here
imports torch until a repair or an evaluation runs.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from surgeon.progress import NullProgress, Progress
from surgeon.recipe.loader import LoadedRecipe, load_recipe
from surgeon.recipe.options import EvalOptions, RunOptions
from surgeon.recipe.schema import Recipe as RecipeSettings
from surgeon.records import Evaluation, ModelScores, RunRecord


def _settings(overrides: Mapping[str, Any] | None) -> tuple[str, ...]:
    """{"restore.steps": 3} as the CLI's `--set restore.steps=3` (each value written as YAML)."""
    return tuple(f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
                 for key, value in (overrides or {}).items())


def _warned(loaded: LoadedRecipe) -> LoadedRecipe:
    """Each old spelling the recipe was read with, as a FutureWarning (shown to a script's user
    by default; the CLI prints its own lines)."""
    for note in loaded.deprecations:
        warnings.warn(note, FutureWarning, stacklevel=3)
    return loaded


@dataclass(frozen=True)
class Recipe:
    """A validated recipe: loaded from a file (with what it `extends`) or built from a mapping,
    with settings laid over it as `--set` lays them (dotted keys, checked by the same schema)."""

    loaded: LoadedRecipe

    @classmethod
    def load(cls, path: str | Path, overrides: Mapping[str, Any] | None = None, settings: tuple[str, ...] = ()) -> "Recipe":
        """The recipe file at `path`, with `overrides` ({"restore.steps": 3}) over it, or `settings`
        as the CLI's --set gives them ("restore.steps=3", the value read as YAML)."""
        return cls(_warned(load_recipe(path, (*settings, *_settings(overrides)))))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], folder: str | Path = ".", overrides: Mapping[str, Any] | None = None) -> "Recipe":
        """A recipe written in Python; its relative paths and `extends` start at `folder`."""
        text = yaml.safe_dump(dict(data), sort_keys=False)
        return cls(_warned(load_recipe(Path(folder) / "recipe.yaml", _settings(overrides), text=text)))

    def override(self, overrides: Mapping[str, Any]) -> "Recipe":
        """This recipe with more settings over it (the recipe itself is left as it was)."""
        return Recipe(load_recipe(self.loaded.path, _settings(overrides), text=self.loaded.text))

    @property
    def settings(self) -> RecipeSettings:
        """Every setting, defaults included (the schema's models)."""
        return self.loaded.recipe

    @property
    def text(self) -> str:
        """The recipe as the output's recipe.yaml keeps it."""
        return self.loaded.text

    def validate(self, progress: Progress = NullProgress()) -> dict:
        """`surgeon validate`: references resolved, data read, base and tuned compared, from headers
        only; raises on the first problem."""
        from surgeon.pipeline import validate

        return validate(self.loaded, progress)


@dataclass(frozen=True)
class Result:
    """A finished repair: where it was written, what it chose, the models' scores and the whole record."""

    output: Path
    method: str
    chosen_step: int | None
    scores: dict[str, ModelScores]  # model name -> its row of the final table (harmful_rate, over_refusal, task_score, ...)
    record: RunRecord = field(repr=False)  # surgeon.json


def _recipe(recipe: Recipe | str | Path) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else Recipe.load(recipe)


def repair(recipe: Recipe | str | Path, output: str | Path | None = None, overwrite: bool = False, device: str | None = None,
           fresh: bool = False, force_push: bool = False, overrides: Mapping[str, Any] | None = None,
           progress: Progress = NullProgress()) -> Result:
    """`surgeon run`: repair with the recipe's method and write the output atomically (the same
    guarantees: nothing replaced that surgeon did not write, resume after an interruption)."""
    from surgeon.pipeline import destination, run

    loaded = _recipe(recipe)
    if overrides:
        loaded = loaded.override(overrides)
    options = RunOptions(output=None if output is None else str(output), overwrite=overwrite, device=device, fresh=fresh, force_push=force_push)
    record = run(loaded.loaded, options, progress)
    return Result(destination(loaded.loaded, options), record.method, record.tradeoff.chosen_step if record.tradeoff else None,
                  record.evaluation.models if record.evaluation else {}, record)


def evaluate(models: list[str], recipe: Recipe | str | Path | None = None, progress: Progress = NullProgress(), **options) -> Evaluation:
    """`surgeon eval`: each model's harmful rate, over-refusal, task score (and, against a
    recipe's tuned, KL) side by side; `options` are the command's flags (safety=, task=, metric=,
    benign=, limit=, answers=, ...)."""
    from surgeon.pipeline import EvalRequest, evaluate_models

    loaded = None if recipe is None else _recipe(recipe).loaded
    return evaluate_models(EvalRequest(list(models), loaded, EvalOptions(**options)), progress)
