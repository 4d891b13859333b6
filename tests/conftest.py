import json
from pathlib import Path

import pytest
import torch
import yaml

from surgeon.tiny import ANSWERS, HARMFUL, TASK, make_pair
from tests.hubserver import FakeHub


class _Pairs(dict):
    """(base, tuned) folders per family, made the first time a test asks for one."""

    def __init__(self, root):
        super().__init__()
        self.root = root

    def __missing__(self, arch):
        self[arch] = make_pair(self.root, arch)
        return self[arch]


@pytest.fixture(scope="session")
def model_pairs(tmp_path_factory):
    """(base, tuned) folders per architecture, saved in several shards."""
    return _Pairs(tmp_path_factory.mktemp("models"))


@pytest.fixture
def llama(model_pairs):
    return model_pairs["llama"]


@pytest.fixture(scope="session")
def llama_fp32(tmp_path_factory):
    """A llama pair stored in fp32 (the profile stores bf16): for checks that compute a method's
    formula in fp32 and compare it with the output exactly."""
    return make_pair(tmp_path_factory.mktemp("fp32"), "llama", dtype=torch.float32)


def recipe_dict(base, tuned, **sections) -> dict:
    """A small restore recipe over the tiny pair; each section given is merged into its default
    (`rollback=` into restore.rollback)."""
    if "rollback" in sections:
        sections["restore"] = {**sections.get("restore", {}), "rollback": {"mode": "never", **sections.pop("rollback")}}
    recipe = {
        "base": str(base),
        "tuned": str(tuned),
        "data": {"harmful": {"prompts": HARMFUL}, "task": {"prompts": TASK}},
        "probe": {"layer": 4, "batch_size": 4},
        "restore": {"sparsity": 0.01, "steps": 3, "warmup": 0, "save_every": 1, "rollback": {"mode": "never"}},
        # harm and over-refusal off unless a test measures them: the shipped sets' 159 and 118 answers
        # per model would dominate the suite
        "evaluate": {"safety": "none", "benign": "none"},
        "compute": {"device": "cpu"},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    return recipe


@pytest.fixture
def write_recipe(tmp_path):
    def write(base, tuned, name="recipe.yaml", **sections) -> Path:
        recipe = recipe_dict(base, tuned, **sections)
        recipe.setdefault("output", {"path": str(tmp_path / "repaired"), "max_shard_size": "40KB"})
        path = tmp_path / name
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        return path

    return write


@pytest.fixture
def task_eval_file(tmp_path):
    path = tmp_path / "task_eval.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "response": a}) + "\n" for p, a in zip(TASK, ANSWERS)))
    return path


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Each test gets its own generation cache: nothing written to ~/.cache, no test sees another's."""
    monkeypatch.setenv("SURGEON_CACHE", str(tmp_path / "surgeon-cache"))


@pytest.fixture
def hub(tmp_path, monkeypatch):
    server = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login-token"))
    yield server
    server.close()


# fixtures that build tiny models: a test that asks for one runs the engine or a whole pipeline
_MODEL_FIXTURES = {"llama", "llama_fp32", "model_pairs"}


def pytest_collection_modifyitems(items):
    """The fast tier (`pytest -m "not slow"`) is every test that needs no model: recipes, judges,
    metrics, intervals, masks, top-k, records. Tests that build a model, and the subprocess ones
    that mark themselves, are `slow`; CI runs both."""
    for item in items:
        if _MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
