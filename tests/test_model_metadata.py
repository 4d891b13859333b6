"""config.json and adapter_config.json values are checked against the checkpoint before anything is
built from them: each bad one is one line, exit 2, in seconds (not a hang, not a traceback)."""

import json
import math
import shutil
import time

import pytest
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
