"""The structure docs/architecture.md draws, held by the code's imports: no circle among surgeon's
modules, io below the engine, the engine below the methods and the evaluation, and the recipe
layer, the records and the method registry free of torch."""

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "surgeon"
MAP = PACKAGE.parent / "docs" / "architecture.md"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


MODULES = _modules()


def imports(name: str, module_level: bool, type_checking: bool = True) -> set[str]:
    """What module `name` imports: at module level (with its TYPE_CHECKING blocks, unless not
    `type_checking`), or anywhere."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text())
    nodes = ast.walk(tree) if not module_level else _module_level(tree.body) if type_checking else tree.body
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names}
    return found


def _module_level(body):
    for node in body:
        yield node
        if isinstance(node, ast.If):  # if TYPE_CHECKING: ...
            yield from _module_level(node.body)


def test_no_circle_among_modules():
    graph = {name: {m for m in imports(name, module_level=True) if m in MODULES and m != name} for name in MODULES}
    state = {}

    def visit(name, path):
        state[name] = "open"
        for other in sorted(graph[name]):
            assert state.get(other) != "open", f"import circle: {' -> '.join(path + [other])}"
            if other not in state:
                visit(other, path + [other])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


ABOVE = {  # a layer and what it must not import, at any level
    "surgeon.io": ("surgeon.engine", "surgeon.evaluation", "surgeon.methods", "surgeon.publish", "surgeon.pipeline", "surgeon.context",
                   "surgeon.cli", "click"),
    "surgeon.engine": ("surgeon.evaluation", "surgeon.methods", "surgeon.publish", "surgeon.pipeline", "surgeon.context", "surgeon.cli", "click"),
    "surgeon.recipe": ("torch", "surgeon.engine", "surgeon.io", "surgeon.evaluation", "surgeon.pipeline", "click"),
}
TORCH_FREE = ("surgeon.records", "surgeon.methods.interface", "surgeon.methods.registry", "surgeon.methods.records",
              "surgeon.methods.settings", "surgeon.methods.restore.record", "surgeon.methods.safe_delta.settings")


@pytest.mark.parametrize("layer", sorted(ABOVE))
def test_a_layer_imports_nothing_above_it(layer):
    for name in (m for m in MODULES if m == layer or m.startswith(layer + ".")):
        upward = {m for m in imports(name, module_level=False) for above in ABOVE[layer] if m == above or m.startswith(above + ".")}
        assert not upward, f"{name} imports {sorted(upward)}"


@pytest.mark.parametrize("name", TORCH_FREE)
def test_the_records_and_the_registry_need_no_torch(name):
    assert not {m for m in imports(name, module_level=True, type_checking=False) if m == "torch" or m.startswith("torch.")}, name


def _map_rows() -> dict[str, str]:
    """docs/architecture.md's module table: path (a module, or a package ending in /) -> its
    "knows about" column."""
    rows = {}
    for line in MAP.read_text().splitlines():
        row = re.match(r"\| `([\w/]+(?:\.py|/))` \| .* \| ([^|]*) \|$", line)
        if row:
            rows[row.group(1)] = row.group(2)
    return rows


EVERYWHERE = {"surgeon", "surgeon.errors", "surgeon.progress"}


def test_the_maps_knows_about_column_names_what_each_module_imports():
    """Each surgeon module a module imports (anywhere in it) is named in its row: as a module path
    (`engine/masks`, `masks`), its package (`engine`), or `all below`."""
    rows = _map_rows()
    assert len(rows) > 40
    for path, knows in rows.items():
        dotted = "surgeon." + path.removesuffix(".py").removesuffix("/").replace("/", ".")
        members = [m for m in MODULES if m == dotted or m.startswith(dotted + ".")] if path.endswith("/") else [dotted]
        assert members and all(m in MODULES for m in members), f"docs/architecture.md names {path}, which is not a module"
        if "all below" in knows:
            continue
        named = [token.replace("/", ".").split(".") for token in re.findall(r"[\w/]+", knows)]
        for member in members:
            for used in imports(member, module_level=False):
                if used not in MODULES or used in EVERYWHERE or used == member or used in members:
                    continue
                parts = used.split(".")[1:]
                assert any(parts[: len(t)] == t or parts[-len(t):] == t for t in named), \
                    f"{path} imports {used}, which its row's 'knows about' ({knows}) does not name"
