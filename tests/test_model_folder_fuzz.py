"""A model-folder fuzzer: whatever config.json, adapter_config.json or the shard index hold,
`surgeon validate` ends with exit 0, or with exit 2 and `error: ...` lines. Never an internal
error, a hang or a traceback (the recipe fuzzer's rule, for the files a model folder brings; a
billion-layer config hung validate for minutes)."""

import json
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_recipe_fuzz import SETTINGS, examples, validates_or_says_why

# the values that broke transformers' config classes and surgeon's readers when these were probed by hand
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-3, max_value=200), st.sampled_from([10**9, 10**30, -(10**9)]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["llama", "default", "linear", "llama3", "yarn", "bfloat16", "float32", "../x", "/etc/passwd", "model.safetensors"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=6)


@st.composite
def mutated(draw, document: dict, nested: tuple[str, ...] = ()) -> dict:
    """`document` with one to three of its keys (or a nested mapping's) replaced, deleted or added."""
    document = json.loads(json.dumps(document))
    for _ in range(draw(st.integers(1, 3))):
        holder = document
        for key in nested:
            if draw(st.booleans()) and isinstance(holder.get(key), dict):
                holder = holder[key]
        key = draw(st.sampled_from(sorted(holder)) | st.text(max_size=8)) if holder else draw(st.text(max_size=8))
        if draw(st.integers(0, 5)) == 0:
            holder.pop(key, None)
        else:
            holder[key] = draw(values)
    return document


def _folder(source, folder):
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(source, folder)
    return folder


def test_mutated_configs_and_shard_indexes_end_in_ok_or_one_line(llama, tmp_path):
    config = json.loads((llama[1] / "config.json").read_text())
    index = json.loads((llama[1] / "model.safetensors.index.json").read_text())
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: linear\nbase: {llama[0]}\ntuned: {tmp_path / 'tuned'}\n")

    @settings(max_examples=examples(150), **SETTINGS)
    @given(st.one_of(st.tuples(st.just("config.json"), mutated(config, ("rope_parameters",))),
                     st.tuples(st.just("model.safetensors.index.json"), mutated(index, ("weight_map", "metadata")))))
    def check(change):
        name, document = change
        (_folder(llama[1], tmp_path / "tuned") / name).write_text(json.dumps(document))
        validates_or_says_why(recipe)

    check()


@pytest.fixture(scope="module")
def adapter(model_pairs, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = model_pairs["llama"][0]
    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
    return folder


def test_mutated_adapter_configs_end_in_ok_or_one_line(llama, adapter, tmp_path):
    config = json.loads((adapter / "adapter_config.json").read_text())
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: linear\nbase: {llama[0]}\ntuned: {tmp_path / 'adapter'}\n")

    @settings(max_examples=examples(100), **SETTINGS)
    @given(mutated(config))
    def check(document):
        (_folder(adapter, tmp_path / "adapter") / "adapter_config.json").write_text(json.dumps(document))
        validates_or_says_why(recipe)

    check()
