"""Read a recipe file: YAML with line numbers, strict validation, one message per bad field."""

from __future__ import annotations

import difflib
import hashlib
import os
import stat
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from surgeon.errors import RecipeError, RecipeValidationError
from surgeon.recipe.schema import Recipe, recipe_model

_SECRET_KEYS = {"token", "hf_token", "api_key", "password"}

# A recipe is a few dozen keys; these bounds keep a hostile or broken file from exhausting the
# parser (deep nesting recurses in PyYAML's composer, aliases expand without limit).
MAX_RECIPE_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_EXPANDED_NODES = 100_000
_CORE = "tag:yaml.org,2002:"
_EXPLICIT_TAGS = {_CORE + name for name in ("str", "int", "float", "bool", "null", "seq", "map")}


@dataclass(frozen=True)
class LoadedRecipe:
    recipe: Recipe
    path: Path
    text: str
    origins: dict = field(default_factory=dict, repr=False, compare=False)  # key path -> the file:line (or --set) that set it
    deprecations: tuple[str, ...] = ()  # old spellings read, each a line naming where and the new one

    def origin(self, dotted: str) -> str | None:
        """Where a recipe field was set: its own key's line, else its nearest parent's."""
        parts = tuple(dotted.split("."))
        return next((self.origins[parts[:i]] for i in range(len(parts), 0, -1) if parts[:i] in self.origins), None)

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def resolved_text(self) -> str:
        """Every setting, defaults included, as YAML (`surgeon validate --print`)."""
        settings = self.recipe.model_dump(mode="json", exclude={"extends"})
        return yaml.safe_dump(settings, sort_keys=False)

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


def _line_map(node: yaml.Node, file: str, path: tuple = ()) -> dict[tuple, str]:
    """Map each key path to `file:line` (1-based), refusing duplicate keys (PyYAML keeps the last)."""
    lines = {path: f"{file}:{node.start_mark.line + 1}"}
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                raise RecipeError(f"duplicate key '{key}'", f"{file}:{key_node.start_mark.line + 1}")
            seen.add(key)
            lines[path + (key,)] = f"{file}:{key_node.start_mark.line + 1}"
            lines.update({k: v for k, v in _line_map(value_node, file, path + (key,)).items() if k != path + (key,)})
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines.update(_line_map(item, file, path + (index,)))
    return lines


def _decode(raw: bytes, file: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise RecipeError(f"not UTF-8 text (byte 0x{raw[exc.start]:02x})", f"{file}:{line}") from None


def _check_events(text: str, file: str) -> None:
    """Depth and tags from the parser's event stream, which is iterative: the composer that
    comes after it recurses once per level."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        where = f"{file}:{event.start_mark.line + 1}"
        tag = getattr(event, "tag", None)
        if tag is not None and tag not in _EXPLICIT_TAGS:
            raise RecipeError(f"YAML tag '{tag}' is not allowed in a recipe", where)
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise RecipeError(f"nested deeper than {MAX_DEPTH} levels", where)
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _check_nodes(root: yaml.Node, file: str) -> None:
    """Keys are scalars; the tree that aliases expand to stays small and shallow (no billion laughs)."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    open_ids: set[int] = set()  # nodes whose children are being counted: the current path
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in size:
            continue
        children = []
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    raise RecipeError("a key must be a plain word, not a list or mapping", f"{file}:{key_node.start_mark.line + 1}")
                children += [key_node, value_node]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        where = f"{file}:{node.start_mark.line + 1}"
        if not children_done:
            if id(node) in open_ids:
                raise RecipeError("an alias refers to the mapping or list that contains it", where)
            open_ids.add(id(node))
            stack.append((node, True))
            stack.extend((child, False) for child in children if id(child) not in size)
            continue
        open_ids.discard(id(node))
        size[id(node)] = 1 + sum(size[id(c)] for c in children)
        depth[id(node)] = 1 + max((depth[id(c)] for c in children), default=0)
        if size[id(node)] > MAX_EXPANDED_NODES:
            raise RecipeError(f"anchors and aliases expand to more than {MAX_EXPANDED_NODES:,} values", where)
        if depth[id(node)] > MAX_DEPTH:
            raise RecipeError(f"aliases expand to nesting deeper than {MAX_DEPTH} levels", where)


def _compose(text: str, file: str) -> tuple[yaml.Node | None, object]:
    """The node tree (for line numbers) and the data built from that same tree."""
    _check_events(text, file)
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, None
        _check_nodes(node, file)
        return node, loader.construct_document(node)
    finally:
        loader.dispose()


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


def _location(data, error: dict) -> tuple:
    """The error's path through the recipe's own keys: pydantic puts union members' tags
    (`int`, `function-after[...]`) into `loc` too, and only the data tells them from keys."""
    *parents, last = error["loc"] or ("",)
    path, node = [], data
    for part in parents:
        if isinstance(node, dict) and part in node or isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            path.append(part)
            node = node[part]
    if error["type"] == "missing" or isinstance(node, dict) and last in node or isinstance(node, list) and isinstance(last, int) and 0 <= last < len(node):
        path.append(last)
    return tuple(path)


def _printable(text: str) -> str:
    """A key as a message may quote it: control characters escaped, so none reaches the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _describe(data, error: dict) -> tuple[tuple, str]:
    loc = _location(data, error)
    dotted = ".".join(_printable(str(p)) for p in loc) or "recipe"
    if error["type"] == "extra_forbidden" and loc:
        key = str(loc[-1])
        if key.lower() in _SECRET_KEYS:
            return loc, f"'{dotted}' is not allowed: secrets never go in a recipe; set HF_TOKEN in the environment"
        owner = _model_at(recipe_model(), loc[:-1])
        known = list(owner.model_fields) if owner else []
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else (f"; expected one of: {', '.join(known)}" if known else "")
        return loc, f"unknown key '{dotted}'{hint}"
    if error["type"] == "missing":
        return loc, f"missing required key '{dotted}'"
    if error["type"] in ("model_type", "model_attributes_type", "dict_type"):  # pydantic would name its class
        given = error.get("input")
        return loc, f"{dotted}: expected a mapping of keys, not {'null' if given is None else type(given).__name__}; leave the key out for its defaults"
    message = error["msg"].removeprefix("Value error, ")
    return loc, f"{dotted}: {message}" if loc else message


def _tree(text: str, file: str) -> tuple[dict, dict[tuple, str]]:
    """The recipe's data and where each key was set."""
    try:
        node, data = _compose(text, file)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f"{file}:{mark.line + 1}"
        elif isinstance(exc, yaml.reader.ReaderError):
            where = f"{file}:{text.count(chr(10), 0, exc.position) + 1}"
        else:
            where = file
        reason = getattr(exc, "problem", None) or getattr(exc, "reason", None) or str(exc)
        raise RecipeError(f"not valid YAML: {reason}", where) from None
    except (ValueError, OverflowError) as exc:  # a value PyYAML resolves but cannot build, e.g. a date 2024-13-45
        raise RecipeError(f"cannot read a value: {exc}", file) from None
    if node is None:
        raise RecipeError("the recipe is empty", file)
    lines = _line_map(node, file)
    if not isinstance(data, dict):
        raise RecipeError("a recipe is a mapping of keys (base:, tuned:, data:, ...)", file)
    return data, lines


def _validate(data: dict, lines: dict[tuple, str], file: str) -> Recipe:
    try:
        return recipe_model().model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc, message = _describe(data, error)
            where = next((lines[loc[:i]] for i in range(len(loc), -1, -1) if loc[:i] in lines), None)
            problems.append((message, where or file))
        raise RecipeValidationError(problems) from None


def parse_recipe(text: str, file: str = "<recipe>") -> Recipe:
    data, lines = _tree(text, file)
    _moved(data, lines, [])
    return _validate(data, lines, file)


# -- extends: a recipe on top of a shipped one or another file -----------------------------------

SHIPPED = Path(__file__).parent.parent / "recipes"  # a link to the repository's recipes/, copied into the wheel
MAX_EXTENDS = 8


def shipped_recipes() -> dict[str, Path]:
    return {path.stem: path for path in sorted(SHIPPED.glob("*.yaml"))}


def _parent(reference, path: Path, where: str) -> Path:
    """`extends`: a shipped recipe by name, or a file by path from the extending recipe's folder."""
    if not isinstance(reference, str) or not reference:
        raise RecipeError("extends names a shipped recipe or a recipe file", where)
    if "/" not in reference and not reference.endswith((".yaml", ".yml")):
        shipped = shipped_recipes()
        if reference not in shipped:
            close = difflib.get_close_matches(reference, shipped, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; shipped: {', '.join(shipped)}"
            raise RecipeError(f"no shipped recipe '{reference}'{hint}", where)
        return shipped[reference]
    return (path.parent / Path(reference).expanduser()).resolve()


def _merge(parent: dict, child: dict) -> dict:
    """The child's keys over the parent's: mappings merge key by key, anything else is replaced."""
    merged = dict(parent)
    for key, value in child.items():
        merged[key] = _merge(parent[key], value) if isinstance(value, dict) and isinstance(parent.get(key), dict) else value
    return merged


def _read(path: Path) -> str:
    try:
        # a FIFO or a device would block the open or never end: only a regular file is a recipe
        with open(path, "rb", opener=lambda name, flags: os.open(name, flags | os.O_NONBLOCK)) as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise RecipeError("a recipe is a regular file; this is not one (a pipe or a device)", str(path))
            raw = handle.read(MAX_RECIPE_BYTES + 1)
    except OSError as exc:
        raise RecipeError(f"cannot read recipe: {exc.strerror}", str(path)) from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError(f"a recipe is at most {MAX_RECIPE_BYTES // 1024} KiB; this file is larger", str(path))
    return _decode(raw, str(path))


# old top-level sections and the section they now live in; each file's are moved before files are merged
MOVED = {"rollback": "restore"}


def _moved(data: dict, lines: dict[tuple, str], notes: list[str]) -> None:
    """A section at its old place moves into its new one (a note for each, naming where it was
    set); given at both, the recipe is refused."""
    for old, parent in MOVED.items():
        if old not in data:
            continue
        where = lines.get((old,), "<recipe>")
        section = data.get(parent) or {}
        if not isinstance(section, dict):
            continue  # validation names the parent's type
        if old in section:
            raise RecipeError(f"'{old}' and '{parent}.{old}' are the same section: keep '{parent}.{old}'", where)
        data[parent] = {**section, old: data.pop(old)}
        for key in [k for k in lines if k[:1] == (old,)]:
            lines[(parent, *key)] = lines.pop(key)
        notes.append(f"'{old}:' is now '{parent}.{old}:'; the top-level section is deprecated, and still read ({where})")


def _load_tree(path: Path, chain: tuple[Path, ...] = (), text: str | None = None,
               notes: list[str] | None = None) -> tuple[dict, dict[tuple, str], str]:
    """Data, where each key was set (the file that set it last), and this file's text (`text`, for
    a recipe that is not a file, stands for what `path` would hold); `notes` gets a line per old
    spelling read."""
    text = _read(path) if text is None else text
    data, lines = _tree(text, str(path))
    _moved(data, lines, [] if notes is None else notes)
    if "extends" not in data:
        return data, lines, text
    where = lines[("extends",)]
    parent = _parent(data["extends"], path, where)
    if parent in chain or parent == path.resolve():
        raise RecipeError(f"extends goes round in a circle back to {parent.name}", where)
    if len(chain) >= MAX_EXTENDS:
        raise RecipeError(f"extends chains more than {MAX_EXTENDS} recipes", where)
    parent_data, parent_lines, _ = _load_tree(parent, (*chain, path.resolve()), notes=notes)
    parent_data.pop("extends", None)
    return _merge(parent_data, data), {**parent_lines, **lines}, text


def _override(data: dict, lines: dict[tuple, str], setting: str, notes: list[str]) -> None:
    """One `--set key.path=value`: the value read as YAML, set at the dotted path. A plain string on
    the way stands for its {path: ...} form (as the schema reads it); missing mappings are made."""
    where = f"--set {setting}"
    key, equals, raw = setting.partition("=")
    parts = key.strip().split(".")
    if not equals or not all(parts):
        raise RecipeError("--set takes key.path=value, e.g. restore.steps=3", where)
    if parts[0] in MOVED:
        notes.append(f"'{'.'.join(parts)}' is now '{MOVED[parts[0]]}.{'.'.join(parts)}'; the old name is deprecated, and still read ({where})")
        parts = [MOVED[parts[0]], *parts]
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise RecipeError(f"the value is not valid YAML: {getattr(exc, 'problem', None) or exc}", where) from None
    owner = data
    for depth, part in enumerate(parts[:-1], 1):
        current = owner.get(part)
        current = {"path": current} if isinstance(current, str) else {} if current is None else current
        if not isinstance(current, dict):
            raise RecipeError(f"'{'.'.join(parts[:depth])}' is not a mapping", where)
        owner[part] = dict(current)
        owner = owner[part]
    owner[parts[-1]] = value
    lines[tuple(parts)] = where
    for depth in range(1, len(parts)):  # mappings the setting made; those the files set keep their lines
        lines.setdefault(tuple(parts[:depth]), where)


def load_recipe(path: str | Path, settings: tuple[str, ...] = (), text: str | None = None) -> LoadedRecipe:
    """The recipe at `path` (with what it extends), with each `key.path=value` of `settings` over it;
    `text`, a recipe written elsewhere (Python), read as if it were the file at `path` (relative paths
    and `extends` start at its folder)."""
    path, notes = Path(path), []
    data, lines, text = _load_tree(path, text=text, notes=notes)
    for setting in settings:
        _override(data, lines, setting, notes)
    recipe = _validate(data, lines, str(path))
    if "extends" in data or settings or notes:
        # the copy kept with the output stands alone: what was extended and what was set, merged in
        resolved = {key: value for key, value in data.items() if key != "extends"}
        merged = ([f"what it extends ({data['extends']})"] if "extends" in data else []) + ([" ".join(f"--set {s}" for s in settings)] if settings else [])
        header = f"# {path.name}" + (f", with {' and '.join(merged)} merged in" if merged else "") \
            + (", its old sections moved to their current places," if notes else "") + " by surgeon\n"
        text = header + yaml.safe_dump(resolved, sort_keys=False)
    return LoadedRecipe(recipe=recipe, path=path.resolve(), text=text, origins=lines, deprecations=tuple(notes))
