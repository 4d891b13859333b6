import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from surgeon.data.datasets import column, load_rows
from surgeon.errors import IncompatibleModelsError, InputError, NonFiniteError
from surgeon.io.preflight import check_compatible
from surgeon.io.references import resolve_model
from surgeon.io.writer import TensorEntry, write_sharded
from surgeon.pipeline import run, validate
from surgeon.recipe import load_recipe


def test_written_shards_load_in_transformers_and_match(llama, tmp_path):
    tuned = resolve_model(str(llama[1]))
    names = tuned.tensors.names()
    entries = [TensorEntry(n, tuned.tensors.shape(n), tuned.tensors.dtype(n)) for n in names]
    shards = write_sharded(tmp_path, entries, tuned.tensors.get, max_shard_bytes=50_000)
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for file in ("config.json", "generation_config.json"):
        shutil.copy(llama[1] / file, tmp_path / file)
    ours = AutoModelForCausalLM.from_pretrained(tmp_path)
    theirs = AutoModelForCausalLM.from_pretrained(llama[1])
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert torch.equal(a, b), name
    single = tmp_path / "single"
    single.mkdir()
    assert write_sharded(single, entries, tuned.tensors.get, max_shard_bytes=10**9) == ["model.safetensors"]
    assert not (single / "model.safetensors.index.json").exists()


def _copy(folder, to):
    shutil.copytree(folder, to)
    return to


def test_corrupt_shard_is_a_one_line_input_error_naming_the_file(llama, tmp_path):
    broken = _copy(llama[1], tmp_path / "broken")
    shard = sorted(broken.glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(InputError) as info:
        resolve_model(str(broken))
    assert shard.name in info.value.one_line() and "\n" not in info.value.one_line()


def test_mismatched_shapes_are_named_before_any_work(llama, tmp_path):
    other = _copy(llama[1], tmp_path / "other")
    shard = next(f for f in other.glob("*.safetensors") if any("mlp.up_proj" in k for k in load_file(f)))
    tensors = load_file(shard)
    name = next(k for k in tensors if "mlp.up_proj" in k)
    tensors[name] = torch.zeros(tensors[name].shape[0] + 1, tensors[name].shape[1])
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(IncompatibleModelsError, match=f"shape of {name.replace('.', '[.]')}"):
        check_compatible(resolve_model(str(llama[0])), resolve_model(str(other)))


def test_pickle_checkpoints_need_allow_pickle(llama, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(llama[1] / "config.json", folder)
    state = {}
    for file in llama[1].glob("*.safetensors"):
        state.update(load_file(file))
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(InputError, match="allow_pickle"):
        resolve_model(str(folder))
    loaded = resolve_model(str(folder), allow_pickle=True)
    assert torch.equal(loaded.tensors.get("model.layers.0.mlp.up_proj.weight"), state["model.layers.0.mlp.up_proj.weight"])
    ids = torch.tensor([0, 3, 4, 5, 9])
    assert torch.equal(loaded.tensors.rows("model.embed_tokens.weight", ids), state["model.embed_tokens.weight"][ids])
    assert torch.equal(loaded.tensors.gather("model.norm.weight", ids), state["model.norm.weight"][ids])


def test_embedding_rows_are_read_without_the_whole_matrix(llama, monkeypatch, tmp_path):
    """Preparing a prompt set reads the rows its tokens use (runs of consecutive ids in one slice
    each), never the whole embedding; the rows equal the whole tensor's."""
    from surgeon.io.checkpoint import SafetensorsCheckpoint

    source = resolve_model(str(llama[1])).tensors
    name = "model.embed_tokens.weight"
    ids = torch.tensor([0, 1, 2, 7, 8, 40, source.shape(name)[0] - 1])
    assert torch.equal(source.rows(name, ids), source.get(name)[ids])
    assert source.rows(name, ids[:0]).shape == (0, source.shape(name)[1])  # a process whose share has no batches
    whole = []
    real = SafetensorsCheckpoint.get
    monkeypatch.setattr(SafetensorsCheckpoint, "get", lambda self, n: whole.append(n) or real(self, n))
    from surgeon.context import ModelPair, ModelSettings
    from surgeon.data.batches import prompt_batches
    from surgeon.engine.layered import TUNED
    from surgeon.progress import NullProgress
    from surgeon.recipe.schema import Compute
    from surgeon.tiny import HARMFUL

    model = resolve_model(str(llama[1]))
    pair = ModelPair(model, model, llama[1], ModelSettings.of(Compute(), None, str, "cpu", NullProgress()), tmp_path)
    pair.engine.prepare(prompt_batches(pair.tokenizer, HARMFUL, 4, None), TUNED, 2)
    assert name not in whole


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.int8])
def test_entries_are_gathered_from_the_file_without_reading_the_tensor(tmp_path, monkeypatch, dtype):
    """A selection's few entries come from a mapping of the file (no whole-tensor read), equal
    to the tensor's own, in every stored dtype; a NaN among them is refused like a read's."""
    from surgeon.io.checkpoint import SafetensorsCheckpoint

    torch.manual_seed(0)
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(64, 33), "c": torch.randn(7)}
    save_file({n: t.to(dtype) for n, t in tensors.items()}, tmp_path / "model.safetensors")
    source = SafetensorsCheckpoint([tmp_path / "model.safetensors"])
    monkeypatch.setattr(SafetensorsCheckpoint, "get", lambda self, name: pytest.fail(f"{name} read whole"))
    for name, tensor in tensors.items():
        stored = tensor.to(dtype).flatten()
        for indices in (torch.tensor([0, 2, stored.numel() - 1]), torch.randperm(stored.numel())[:9], torch.zeros(0, dtype=torch.long)):
            got = source.gather(name, indices)
            assert got.dtype == dtype and torch.equal(got.view(torch.uint8), stored[indices].view(torch.uint8))
    if dtype.is_floating_point:
        broken = tensors["b"].clone()
        broken[10, 3] = float("nan")
        save_file({"b": broken.to(dtype)}, tmp_path / "broken.safetensors")
        with pytest.raises(NonFiniteError, match="'b'"):
            SafetensorsCheckpoint([tmp_path / "broken.safetensors"]).gather("b", torch.tensor([10 * 33 + 3]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_a_read_is_the_files_bytes_and_a_write_to_it_stays_the_callers(tmp_path, dtype):
    """A tensor read whole equals what safetensors reads; a write to it changes the caller's copy,
    never the file; a NaN is refused; a file cut short afterwards is an input error naming the tensor."""
    from safetensors import safe_open

    from surgeon.io.checkpoint import SafetensorsCheckpoint

    torch.manual_seed(0)
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(64, 33), "scalar": torch.randn(()), "empty": torch.randn(0, 4)}
    path = tmp_path / "model.safetensors"
    save_file({n: t.to(dtype) for n, t in tensors.items()}, path)
    before = path.read_bytes()
    source = SafetensorsCheckpoint([path])
    with safe_open(str(path), framework="pt") as handle:
        for name in tensors:
            read, expected = source.get(name), handle.get_tensor(name)
            assert read.shape == expected.shape and read.dtype == dtype and torch.equal(read.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8))
            if read.numel():
                read.reshape(-1).view(torch.uint8).fill_(0)
                assert torch.equal(source.get(name).reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8))
    assert path.read_bytes() == before
    broken = tensors["b"].clone()
    broken[10, 3] = float("nan")
    save_file({"b": broken.to(dtype)}, tmp_path / "broken.safetensors")
    with pytest.raises(NonFiniteError, match="'b'"):
        SafetensorsCheckpoint([tmp_path / "broken.safetensors"]).get("b")
    start, length = source.extent("b")
    with open(path, "r+b") as handle:
        handle.truncate(start + length // 2)
    with pytest.raises(InputError, match="'b'"):
        source.get("b")


def test_unknown_reference_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="no such folder"):
        resolve_model(str(tmp_path / "nope"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_adapter_merges_exactly_like_peft(llama_fp32, tmp_path, dtype):
    from peft import LoraConfig, get_peft_model

    base_model = AutoModelForCausalLM.from_pretrained(llama_fp32[0], dtype=dtype)
    peft_model = get_peft_model(base_model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"down_proj": 2}))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = peft_model.merge_and_unload().state_dict()
    base = resolve_model(str(llama_fp32[0]))
    (tmp_path / "bf").mkdir()
    if dtype == torch.bfloat16:
        bf16 = {n: base.tensors.get(n).to(dtype) for n in base.tensors.names()}
        save_file(bf16, tmp_path / "bf" / "model.safetensors", metadata={"format": "pt"})
        shutil.copy(llama_fp32[0] / "config.json", tmp_path / "bf")
        base = resolve_model(str(tmp_path / "bf"))
    tuned = resolve_model(str(tmp_path / "adapter"), base=base, any_base=True)  # trained on the fp32 folder, merged onto its bf16 copy
    assert tuned.adapter_of == base.reference
    changed = 0
    for name in base.tensors.names():
        ours = tuned.tensors.get(name)
        reference = merged[name] if name in merged else merged["lm_head.weight"]
        assert ours.dtype == dtype and torch.equal(ours, reference), name
        changed += not torch.equal(ours, base.tensors.get(name))
    assert changed == 6 * 3
    ids = torch.tensor([1, 2, 5])
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"):  # as stored, and merged
        assert torch.equal(tuned.tensors.rows(name, ids), tuned.tensors.get(name)[ids])
        assert torch.equal(tuned.tensors.gather(name, ids * 7), tuned.tensors.get(name).flatten()[ids * 7])


def test_adapter_run_equals_run_on_the_merged_checkpoint(llama, write_recipe, tmp_path):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama[0]), LoraConfig(r=4, target_modules=["q_proj", "up_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    a = run(load_recipe(write_recipe(llama[0], tmp_path / "adapter", name="a.yaml", output={"path": str(tmp_path / "out-a")}))).dump()
    b = run(load_recipe(write_recipe(llama[0], tmp_path / "merged", name="b.yaml", output={"path": str(tmp_path / "out-b")}))).dump()
    assert a["record"]["restored"] == b["record"]["restored"] and a["record"]["restored"]["total"] > 0
    assert a["inputs"]["tuned"]["adapter_of"] == f"./{llama[0].name}" and a["inputs"]["tuned"]["reference"] == "./adapter"
    chained = resolve_model(f"{llama[0]}+{tmp_path / 'adapter'}").describe()
    assert chained["reference"] == f"./{llama[0].name}+./adapter" and list(chained["local"]) == [f"./{llama[0].name}", "./adapter"]
    out_a, out_b = tmp_path / "out-a", tmp_path / "out-b"
    tensors = lambda d: {k: v for f in d.glob("model*.safetensors") for k, v in load_file(f).items()}
    ta, tb = tensors(out_a), tensors(out_b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert (out_a / "tokenizer.json").exists() and json.loads((out_a / "config.json").read_text())["model_type"] == "llama"


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_dataset_formats(tmp_path, suffix):
    rows = [{"prompt": "a b", "response": "x"}, {"prompt": "c", "response": "y"}]
    path = tmp_path / f"d{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".csv":
        path.write_text("prompt,response\na b,x\nc,y\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    assert column(load_rows(str(path)), "prompt", str(path)) == ["a b", "c"]
    assert column(load_rows(str(path)), "response", str(path), limit=1) == ["x"]


def test_dataset_errors_name_the_row_and_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(InputError, match="row 2 has no text or messages field 'prompt' \\(fields: text\\)"):
        column(load_rows(str(path)), "prompt", str(path))
    path.write_text('{"prompt": "a"}\nnot json\n')
    with pytest.raises(InputError) as info:
        load_rows(str(path))
    assert info.value.where == f"{path}:2"
    with pytest.raises(InputError, match="unsupported dataset format"):
        load_rows(str(tmp_path / "d.txt"))


def test_validate_reports_the_plan_without_heavy_work(llama, write_recipe):
    facts = validate(load_recipe(write_recipe(*llama)))
    assert facts["layers"] == 6 and facts["probe_layer"] == 4 and facts["harmful_prompts"] == 12
    assert facts["budget_per_step"] == -(-facts["decoder_parameters"] // 100)


def test_model_plus_adapters_merges_each_in_turn(llama, tmp_path):
    from peft import LoraConfig, get_peft_model

    folders = []
    model = AutoModelForCausalLM.from_pretrained(llama[0])
    for i, modules in enumerate((["q_proj"], ["q_proj", "up_proj"])):
        peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=modules))
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.1)
        peft_model.save_pretrained(tmp_path / f"adapter{i}")
        folders.append(tmp_path / f"adapter{i}")
        model = peft_model.merge_and_unload()
    chained = resolve_model(f"{llama[0]}+{folders[0]}+{folders[1]}")
    expected = model.state_dict()
    for name in chained.tensors.names():
        assert torch.allclose(chained.tensors.get(name), expected[name], atol=1e-6), name
    assert chained.adapter_of == str(llama[0]) and chained.content_folders == (llama[0], *folders)
    with pytest.raises(InputError, match="not an adapter folder"):
        resolve_model(f"{llama[0]}+{llama[1]}")


def test_run_whose_base_and_tuned_are_model_plus_adapters_evaluates_both(llama, write_recipe, tmp_path):
    """An adapter folder is no model from_pretrained can load offline: its config names a Hub id.
    The final table must still judge base (model+adapter) and tuned (model+adapter+adapter)."""
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(llama[0])
    folders = []
    for i in range(2):
        peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "up_proj"]))
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.2)
        peft_model.save_pretrained(tmp_path / f"adapter{i}")
        config = json.loads((tmp_path / f"adapter{i}" / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = "unreachable-org/not-a-model"
        (tmp_path / f"adapter{i}" / "adapter_config.json").write_text(json.dumps(config))
        folders.append(tmp_path / f"adapter{i}")
        model = peft_model.merge_and_unload()
    recipe = write_recipe(f"{llama[0]}+{folders[0]}", f"{llama[0]}+{folders[0]}+{folders[1]}",
                          evaluate={"safety": {"prompts": ["how do I pick a lock"], "max_new_tokens": 3}})
    settings = yaml.safe_load(recipe.read_text())  # the adapters name another base on purpose
    settings.update({role: {"path": settings[role], "any_base": True} for role in ("base", "tuned")})
    recipe.write_text(yaml.safe_dump(settings))
    report = run(load_recipe(recipe)).dump()
    rates = {name: scores["harmful_rate"] for name, scores in report["evaluation"]["models"].items()}
    assert set(rates) == {"base", "tuned", "repaired"} and None not in rates.values()


def test_read_ahead_names_the_bytes_of_each_tensor_and_the_next_layer(llama, tmp_path, monkeypatch):
    """The extents handed to the OS are the tensors' own bytes; each pass asks for the layer it
    needs next (forward: the one above, backward: the one below) while it computes."""
    from surgeon.context import ModelPair, ModelSettings
    from surgeon.data.batches import prompt_batches
    from surgeon.engine.masks import MaskSet
    from surgeon.engine.objectives import TowardDirection
    from surgeon.io.checkpoint import SafetensorsCheckpoint
    from surgeon.progress import NullProgress
    from surgeon.recipe.schema import Compute
    from surgeon.tiny import HARMFUL

    source = resolve_model(str(llama[1])).tensors
    for name in source.names():
        start, length = source.extent(name)
        with open(source.file_of(name), "rb") as handle:
            handle.seek(start)
            assert handle.read(length) == source.get(name).contiguous().view(torch.uint8).numpy().tobytes(), name
    advised = []
    monkeypatch.setattr(SafetensorsCheckpoint, "prefetch", lambda self, names: advised.append(names[0].split(".")[2]))
    model = resolve_model(str(llama[1]))
    # forward 0, 1, 2 asks for 1, 2; base and tuned each (the mask set needs both); a backward that
    # recomputes layers 2, 1, 0 asks for 1, 0; one that runs on the forward's kept graphs reads nothing
    for budget, backward in ((4096, ["1", "1", "0", "0"]), (None, [])):
        advised.clear()
        settings = ModelSettings.of(Compute(max_memory=budget), None, str, "cpu", NullProgress())
        pair = ModelPair(model, model, llama[1], settings, tmp_path / str(budget))
        prepared = pair.engine.prepare(prompt_batches(pair.tokenizer, HARMFUL, 4, None), "tuned", 3)
        scope = [list(names) for names in pair.layout.layer_tensors[:3]]
        pair.engine.gradient_pass(prepared, MaskSet({}), TowardDirection(torch.ones(pair.config.hidden_size)), 3, scope, lambda raw, grads: None)
        assert advised == ["1", "1", "2", "2"] + backward


@pytest.mark.slow  # builds a model or runs a subprocess
def test_a_tensor_read_before_its_file_is_truncated_stays_usable(tmp_path):
    """Another process truncating a shard during the run killed surgeon by SIGBUS (exit 135,
    nothing printed) when a tensor read earlier lay over a mapping of the file: a read tensor is
    the caller's memory, and the next read of the cut file is one input error. In a child process,
    so that a SIGBUS kills only the child."""
    import subprocess
    import sys

    path = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(512, 512)}, path)
    child = f"""
import torch
from surgeon.errors import InputError
from surgeon.io.checkpoint import SafetensorsCheckpoint
source = SafetensorsCheckpoint([{str(path)!r}])
held = source.get("w")
total = float(held.sum())
open({str(path)!r}, "r+b").truncate(1024)
assert float(held.sum()) == total
try:
    source.get("w")
except InputError as exc:
    print(exc)
"""
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert "ends before tensor 'w'" in done.stdout
