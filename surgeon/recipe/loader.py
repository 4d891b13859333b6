"""Read a recipe file: YAML with line numbers, strict validation, one message per bad field."""

from __future__ import annotations

import difflib
import hashlib
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from surgeon.errors import RecipeError, RecipeValidationError
from surgeon.recipe.schema import Recipe

_SECRET_KEYS = {"token", "hf_token", "api_key", "password"}


@dataclass(frozen=True)
class LoadedRecipe:
    recipe: Recipe
    path: Path
    text: str

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def resolve(self, relative: str, may_be_hub_id: bool = False) -> str:
        """Paths in a recipe are relative to the recipe's folder. A model reference that names
        no existing folder there (and does not start with '.') passes through as a Hub id."""
        candidate = Path(relative).expanduser()
        if may_be_hub_id and "+" in relative and not (self.folder / candidate).exists():
            return "+".join(self.resolve(part, may_be_hub_id) for part in relative.split("+"))
        if candidate.is_absolute() or "://" in relative:
            return str(candidate) if candidate.is_absolute() else relative
        local = self.folder / candidate
        if may_be_hub_id and not local.exists() and not relative.startswith("."):
            return relative
        return str(local)


def _line_map(node: yaml.Node, file: str, path: tuple = ()) -> dict[tuple, int]:
    """Map each key path to its 1-based line, refusing duplicate keys (PyYAML keeps the last)."""
    lines = {path: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                raise RecipeError(f"duplicate key '{key}'", f"{file}:{key_node.start_mark.line + 1}")
            seen.add(key)
            lines[path + (key,)] = key_node.start_mark.line + 1
            lines.update({k: v for k, v in _line_map(value_node, file, path + (key,)).items() if k != path + (key,)})
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines.update(_line_map(item, file, path + (index,)))
    return lines


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the field at `loc`, following Optional/Union annotations."""
    for part in loc:
        if not isinstance(part, str) or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        nested = [a for a in (typing.get_args(annotation) or (annotation,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not nested:
            return None
        model = nested[0]
    return model


def _describe(error: dict) -> tuple[tuple, str]:
    loc = tuple(part for part in error["loc"] if not (isinstance(part, str) and ("[" in part or part in {"str", "int", "float"})))
    dotted = ".".join(str(p) for p in loc) or "recipe"
    if error["type"] == "extra_forbidden":
        key = str(loc[-1])
        if key.lower() in _SECRET_KEYS:
            return loc, f"'{dotted}' is not allowed: secrets never go in a recipe; set HF_TOKEN in the environment"
        owner = _model_at(Recipe, loc[:-1])
        known = list(owner.model_fields) if owner else []
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else (f"; expected one of: {', '.join(known)}" if known else "")
        return loc, f"unknown key '{dotted}'{hint}"
    if error["type"] == "missing":
        return loc, f"missing required key '{dotted}'"
    message = error["msg"].removeprefix("Value error, ")
    return loc, f"{dotted}: {message}" if loc else message


def parse_recipe(text: str, file: str = "<recipe>") -> Recipe:
    try:
        node = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{file}:{mark.line + 1}" if mark else file
        raise RecipeError(f"not valid YAML: {getattr(exc, 'problem', exc)}", where) from None
    if node is None:
        raise RecipeError("the recipe is empty", file)
    lines = _line_map(node, file)
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise RecipeError("a recipe is a mapping of keys (base:, tuned:, data:, ...)", file)
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc, message = _describe(error)
            line = next((lines[loc[:i]] for i in range(len(loc), -1, -1) if loc[:i] in lines), None)
            problems.append((message, f"{file}:{line}" if line else file))
        raise RecipeValidationError(problems) from None


def load_recipe(path: str | Path) -> LoadedRecipe:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise RecipeError(f"cannot read recipe: {exc.strerror}", str(path)) from None
    return LoadedRecipe(recipe=parse_recipe(text, str(path)), path=path.resolve(), text=text)
