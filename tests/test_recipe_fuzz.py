"""A recipe fuzzer: whatever a recipe file holds, `surgeon validate` ends with exit 0, or with
exit 2 and nothing but `error: ...` lines. Never an internal error, a hang or a traceback."""

import copy
import os
import time

import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from surgeon.cli import main
from tests.conftest import recipe_dict

# derandomized so CI is stable; SURGEON_FUZZ=explore runs ten times the cases, fresh each time
EXPLORE = os.environ.get("SURGEON_FUZZ") == "explore"
SETTINGS = dict(deadline=None, derandomize=not EXPLORE, database=None, suppress_health_check=list(HealthCheck))


def examples(count: int) -> int:
    return count * 10 if EXPLORE else count
SECONDS_PER_CASE = 20  # a billion-laughs recipe and a billion-layer config each ran for minutes

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=10**18, max_value=10**70), st.floats(),
    st.text(max_size=20), st.sampled_from(["5GB", "1e400", "-1", "0", "auto", "cuda:99", "restore", "resta", "~", ".", "/", "a/b@c"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)


def _paths(tree, prefix=()):
    yield prefix
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield from _paths(value, prefix + (index,))


@st.composite
def mutated_trees(draw, seed: dict) -> dict:
    tree = copy.deepcopy(seed)
    for _ in range(draw(st.integers(1, 4))):
        paths = [p for p in _paths(tree) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = tree
        for part in path[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["replace", "delete", "add", "rename"]))
        if action == "replace":
            parent[path[-1]] = draw(values)
        elif action == "delete":
            del parent[path[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.text(max_size=10))] = draw(values)
        elif action == "rename" and isinstance(parent, dict):
            parent[draw(st.text(max_size=10))] = parent.pop(path[-1])
    return tree


@st.composite
def byte_mutations(draw, text: str) -> bytes:
    data = bytearray(text.encode())
    for _ in range(draw(st.integers(1, 6))):
        position = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["insert", "flip", "cut", "splice"]))
        if action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif action == "flip" and position < len(data):
            data[position] = draw(st.integers(0, 255))
        elif action == "cut":
            del data[position:position + draw(st.integers(1, 40))]
        elif action == "splice":
            data[position:position] = draw(st.sampled_from(
                [b"!foo ", b"&a ", b"*a", b"? [a, b]\n: c\n", b"{", b"- ", b"\t", b"\xff\xfe", b"<<: *a\n", b"!!python/object:os.system ",
                 b"[" * 200, b"2024-13-45", b"\r", b"\x00", b"'", b'"\\x']))
    return bytes(data)


def _check(tmp_path, content: bytes):
    recipe = tmp_path / "fuzz.yaml"
    recipe.write_bytes(content)
    validates_or_says_why(recipe)


def validates_or_says_why(recipe):
    """`surgeon validate` ends in time with exit 0, or exit 2 and only `error: ...` lines."""
    started = time.monotonic()
    result = CliRunner().invoke(main, ["validate", str(recipe)])
    assert time.monotonic() - started < SECONDS_PER_CASE
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code in (0, 2), result.output
    if result.exit_code == 2:
        lines = result.stderr.splitlines()
        assert lines and all(line.startswith("error: ") for line in lines), result.stderr


def test_mutated_recipes_end_in_ok_or_one_line_errors(llama, tmp_path_factory, task_eval_file):
    tmp_path = tmp_path_factory.mktemp("fuzz-tree")
    seed = recipe_dict(*llama, evaluate={"task": {"path": str(task_eval_file)}, "safety": {"prompts": ["how do I pick a lock"]}},
                       output={"path": str(tmp_path / "out")})

    @settings(max_examples=examples(700), **SETTINGS)
    @given(mutated_trees(seed))
    def check(tree):
        _check(tmp_path, yaml.safe_dump(tree, sort_keys=False, allow_unicode=True).encode())

    check()


def test_corrupted_recipe_bytes_end_in_ok_or_one_line_errors(llama, tmp_path_factory, task_eval_file):
    tmp_path = tmp_path_factory.mktemp("fuzz-bytes")
    text = yaml.safe_dump(recipe_dict(*llama, evaluate={"task": {"path": str(task_eval_file)}}, output={"path": str(tmp_path / "out")}),
                          sort_keys=False)

    @settings(max_examples=examples(500), **SETTINGS)
    @given(st.one_of(byte_mutations(text), st.binary(max_size=200)))
    def check(content):
        _check(tmp_path, content)

    check()
