"""config.json and adapter_config.json values are checked against the checkpoint before anything is
built from them: each bad one is one line, exit 2, in seconds (not a hang, not a traceback)."""

import json
import math
import shutil
import time

import pytest
import torch
from click.testing import CliRunner

from surgeon.cli import main


def _validate(llama, tmp_path, tuned):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: linear\nbase: {llama[0]}\ntuned: {tuned}\n")
    started = time.perf_counter()
    result = CliRunner().invoke(main, ["validate", str(recipe)])
    return result, time.perf_counter() - started


@pytest.mark.parametrize("key, value, message", [
    ("num_hidden_layers", 10**9, "says 1000000000 decoder layers; the checkpoint holds 6"),
    ("num_hidden_layers", "six", "num_hidden_layers is 'six'"),
    ("num_attention_heads", 0, "num_attention_heads is 0"),
    ("hidden_size", [64], "hidden_size is [64]"),
    ("vocab_size", 10**12, "vocab_size 1000000000000 is the row count of no embedding"),
])
def test_a_bad_config_value_is_one_line(llama, tmp_path, key, value, message):
    tuned = tmp_path / "tuned"
    shutil.copytree(llama[1], tuned)
    config = json.loads((tuned / "config.json").read_text())
    config[key] = value
    (tuned / "config.json").write_text(json.dumps(config))
    result, seconds = _validate(llama, tmp_path, tuned)
    assert result.exit_code == 2 and message in result.output and result.output.count("\n") == 1, result.output
    assert "config.json" in result.output and seconds < 5


@pytest.mark.parametrize("field, value", [("r", 0), ("r", "four"), ("lora_alpha", math.nan), ("lora_alpha", -1)])
def test_a_bad_adapter_value_is_one_line(llama, tmp_path, field, value):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama[0]), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config[field] = value
    config["base_model_name_or_path"] = str(llama[0])
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    result, seconds = _validate(llama, tmp_path, adapter)
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "adapter_config.json" in result.output, result.output
    assert seconds < 5


@pytest.mark.parametrize("section", ["data", "evaluate"])
def test_a_prompt_longer_than_the_context_is_one_line_before_any_work(llama, tmp_path, write_recipe, section):
    """A 60,000-token prompt ran for 300 s against a 2,048-token context before this was checked."""
    from surgeon.tiny import HARMFUL

    for side, source in zip(("base", "tuned"), llama):
        shutil.copytree(source, tmp_path / side)
        config = json.loads((tmp_path / side / "config.json").read_text())
        (tmp_path / side / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 256}))
    long = "word " * 3000
    sections = ({"data": {"harmful": {"prompts": [*HARMFUL, long]}}} if section == "data"
                else {"evaluate": {"safety": {"prompts": [long]}, "benign": "none"}})
    recipe = write_recipe(tmp_path / "base", tmp_path / "tuned", **sections)
    started = time.perf_counter()
    result = CliRunner().invoke(main, ["run", str(recipe)])
    assert result.exit_code == 2 and time.perf_counter() - started < 5, result.output
    assert "3,005 tokens with its chat template, longer than the model's context of 256 tokens" in result.stderr.splitlines()[-1]
    assert not (tmp_path / "repaired").exists()


def test_an_adapter_whose_merge_overflows_is_one_line(llama, tmp_path, write_recipe):
    """Finite factors and a finite alpha can still overflow bf16 when merged: the merged weight is
    checked like a stored one, never written as inf."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(llama[0]), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    weights = load_file(adapter / "adapter_model.safetensors")
    save_file({name: torch.full_like(w, 1e5) for name, w in weights.items()}, adapter / "adapter_model.safetensors")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 1e30, "base_model_name_or_path": str(llama[0])}))
    recipe = write_recipe(llama[0], adapter, method="linear")
    result = CliRunner().invoke(main, ["run", str(recipe)])
    assert result.exit_code == 2 and "merged into base" in result.stderr.splitlines()[-1], result.output
    assert not (tmp_path / "repaired").exists()
