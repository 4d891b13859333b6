"""No code from a model folder ever runs, and a folder's safetensors are what is evaluated, never a
pickle beside them (transformers would prefer it)."""

import json
import shutil

import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from surgeon.cli import main
from surgeon.tiny import HARMFUL, write_jsonl


def test_a_config_that_asks_for_custom_code_is_refused_without_running_it(llama, tmp_path):
    marker = tmp_path / "code-ran"
    for source, custom in zip(llama, (tmp_path / "base", tmp_path / "tuned")):
        shutil.copytree(source, custom)
        (custom / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
        (custom / "configuration_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
        config = json.loads((custom / "config.json").read_text())
        config.update(model_type="evil", auto_map={"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.Evil"})
        (custom / "config.json").write_text(json.dumps(config))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: linear\nbase: {tmp_path / 'base'}\ntuned: {tmp_path / 'tuned'}\n")
    result = CliRunner().invoke(main, ["validate", str(recipe)], input="y\n")
    assert result.exit_code == 2 and "custom code" in result.output and result.output.count("\n") == 1, result.output
    assert not marker.exists()


def test_safetensors_under_another_name_are_evaluated_not_the_pickle_beside_them(llama, tmp_path):
    odd = tmp_path / "odd"
    shutil.copytree(llama[1], odd)
    shards = sorted(odd.glob("model*.safetensors"))
    (odd / "model.safetensors.index.json").unlink(missing_ok=True)
    for i, shard in enumerate(shards):
        shard.rename(odd / f"weights-{i}.safetensors")
    base = {}
    for shard in sorted(llama[0].glob("model*.safetensors")):
        base.update(load_file(shard))
    torch.save(base, odd / "pytorch_model.bin")  # base's weights: what from_pretrained would have read
    harmful = write_jsonl(tmp_path / "h.jsonl", [{"prompt": p} for p in HARMFUL[:4]])
    answers = tmp_path / "answers.jsonl"
    result = CliRunner().invoke(main, ["eval", str(llama[1]), str(odd), str(llama[0]), "--safety", str(harmful), "--benign", "none",
                                       "--max-new-tokens", "6", "--answers", str(answers)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    said = lambda model: [r["answer"] for r in rows if r["model"] == model]
    assert said(str(odd)) == said(str(llama[1])) != said(str(llama[0]))


def test_a_shard_index_pointing_outside_the_folder_is_refused(llama, tmp_path):
    """What is read is what is fingerprinted: a shard elsewhere would change the model unrecorded."""
    tuned = tmp_path / "tuned"
    shutil.copytree(llama[1], tuned)
    outside = tmp_path / "outside"
    outside.mkdir()
    index = json.loads((tuned / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    (tuned / first).rename(outside / first)
    index["weight_map"] = {k: (f"../outside/{v}" if v == first else v) for k, v in index["weight_map"].items()}
    (tuned / "model.safetensors.index.json").write_text(json.dumps(index))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: linear\nbase: {llama[0]}\ntuned: {tuned}\n")
    result = CliRunner().invoke(main, ["validate", str(recipe)])
    assert result.exit_code == 2 and "outside the model folder" in result.output and result.output.count("\n") == 1, result.output


def test_a_snapshot_whose_files_link_to_a_blob_store_reads(llama, tmp_path):
    """A Hub snapshot's files are links into its blob store: links in the folder are the folder's."""
    tuned, blobs = tmp_path / "snapshot", tmp_path / "blobs"
    shutil.copytree(llama[1], tuned)
    blobs.mkdir()
    for shard in tuned.glob("model-*.safetensors"):
        shard.rename(blobs / shard.name)
        shard.symlink_to(blobs / shard.name)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: linear\nbase: {llama[0]}\ntuned: {tuned}\n")
    result = CliRunner().invoke(main, ["validate", str(recipe)])
    assert result.exit_code == 0, result.output
