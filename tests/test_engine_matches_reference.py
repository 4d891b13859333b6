"""The streaming engine restores exactly the entries the plain in-memory method does."""

import json

import pytest
import torch

from surgeon.engine.masks import MaskSet
from surgeon.engine.objectives import TowardDirection
from surgeon.pipeline import run
from surgeon.recipe import load_recipe
from surgeon.tiny import ANSWERS, FAMILIES, HARMFUL, TASK
from tests.reference import checkpoint_tensors, reference_repair


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("mode", ["never", "always", "answer_loss"])
def test_streaming_run_matches_reference(model_pairs, write_recipe, task_eval_file, tmp_path, arch, mode):
    """answer_loss: rollback on the gradient of the task answers' loss, through every layer and the head."""
    base, tuned = model_pairs[arch]
    if mode == "answer_loss":
        recipe = write_recipe(base, tuned, rollback={"mode": "always", "objective": "answer_loss"},
                              data={"harmful": {"prompts": HARMFUL}, "task": {"path": str(task_eval_file), "answer_field": "response"}})
    else:
        recipe = write_recipe(base, tuned, rollback={"mode": mode})
    report = run(load_recipe(recipe)).dump()
    out = tmp_path / "repaired"

    expected, k = reference_repair(base, tuned, HARMFUL, TASK, layer=4, sparsity=0.01, steps=3, rollback=mode != "never", batch_size=4,
                                   answers=ANSWERS if mode == "answer_loss" else None)
    masks = MaskSet.load(out / "masks.safetensors")
    assert report["settings"]["budget"] == k
    assert set(masks.names()) == set(expected)
    for name, mask in expected.items():
        assert torch.equal(masks.get(name), mask), name
    restored = sum(int(m.sum()) for m in expected.values())
    assert restored > 0 and masks.count() == restored == report["record"]["restored"]["total"]
    if mode != "never":
        assert all(step["reverted"] > 0 for step in report["record"]["steps"])

    # Output: bit-exact copies of base where masked, tuned everywhere else, all tensors present.
    base_t, tuned_t, out_t = checkpoint_tensors(base), checkpoint_tensors(tuned), checkpoint_tensors(out)
    assert set(out_t) == set(tuned_t)
    for name, value in out_t.items():
        want = torch.where(masks.get(name), base_t[name], tuned_t[name]) if name in expected else tuned_t[name]
        assert value.dtype == tuned_t[name].dtype and torch.equal(value, want), name
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].keys() == out_t.keys()


def test_memory_bound_one_decoder_layer_at_a_time(llama, write_recipe, task_eval_file, tmp_path):
    """With a budget too small for a layer's autograd graphs, one decoder layer is materialized at
    a time (the backward recomputes each layer); the default budget keeps the graphs of the
    probe layer's E layers instead."""
    small = write_recipe(*llama, rollback={"mode": "always"}, evaluate={"task": {"path": str(task_eval_file)}}, compute={"max_memory": 4096})
    assert run(load_recipe(small)).dump()["memory"]["max_decoder_layers_materialized"] == 1
    default = run(load_recipe(write_recipe(*llama, name="default.yaml", output={"path": str(tmp_path / "default")}))).dump()
    assert default["memory"]["max_decoder_layers_materialized"] == default["settings"]["probe_layer"]


def test_gradients_are_the_same_whether_graphs_are_kept_or_layers_recomputed(llama, tmp_path, monkeypatch):
    """A gradient pass with room for every layer's graphs, for some of them, or for none gives
    bit-identical gradients and loss, and keeps the graphs of as many layers as the room allows.
    Nothing of a graph outlives the pass: the recorded graphs of a layer that did not fit, and every
    kept graph of a pass that fails before its backward."""
    import gc

    from transformers import AutoConfig, AutoTokenizer

    from surgeon.allocator import slack
    from surgeon.data.batches import prompt_batches
    from surgeon.engine import layered
    from surgeon.engine.layered import TUNED, LayeredModel
    from surgeon.engine.store import SpillStore
    from surgeon.io.references import resolve_model

    base, tuned = resolve_model(str(llama[0])), resolve_model(str(llama[1]))
    config = AutoConfig.from_pretrained(llama[1])
    batches = prompt_batches(AutoTokenizer.from_pretrained(llama[1]), HARMFUL, 4)
    kept: list[tuple[int, bool, int]] = []
    keep = layered.Graphs.keep
    monkeypatch.setattr(layered.Graphs, "keep", lambda self, i, layer: kept.append((i, keep(self, i, layer), layer.nbytes)) or kept[-1][1])

    def gradients(budget: int | None, layers: int = 3, objective=None) -> tuple[dict, float, list[int]]:
        kept.clear()
        store = SpillStore(budget or 10**9, tmp_path / str(budget))
        engine = LayeredModel(config, base.tensors, tuned.tensors, store)
        prepared = engine.prepare(batches, TUNED, layers)
        inputs = store.used_bytes
        if budget is None:  # room for the graphs of layers 0 and 1 and half of 2's (recorded, then let go),
            # beside the inputs, each layer's boundaries and gradients, and the heap's slack
            store.budget_bytes = inputs + (layers + 2) * inputs + slack() + sizes[0] + sizes[1] + sizes[2] // 2
        grads: dict = {}
        objective = objective or TowardDirection(torch.ones(config.hidden_size))
        loss = engine.gradient_pass(prepared, TUNED, objective, layers, engine.layout.scope(layers),
                                    lambda raw, g: grads.update({n: t.clone() for n, t in g.items()}))
        return grads, loss, [i for i, taken, _ in kept if taken]

    def graphs() -> dict[int, torch.Tensor]:
        """The tensors alive that carry a grad_fn (other tests may leave theirs: held, so that no
        id is reused)."""
        gc.collect()
        return {id(o): o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.grad_fn is not None}

    earlier = graphs()
    whole, loss, taken = gradients(10**9)
    sizes = [size for _, _, size in kept]
    assert taken == [0, 1, 2] and all(size > 0 for size in sizes)
    for budget, expected in ((None, [0, 1]), (1, [])):
        grads, other_loss, taken = gradients(budget)
        assert taken == expected and other_loss == loss
        assert not graphs().keys() - earlier.keys()
        assert grads.keys() == whole.keys() and all(torch.equal(grads[n], whole[n]) for n in whole)

    class Failing:  # a pass that fails after its forward kept every layer's graphs
        def losses(self, *args):
            raise RuntimeError("the objective failed")

    try:
        gradients(10**9, objective=Failing())
    except RuntimeError:
        pass
    assert not graphs().keys() - earlier.keys()


@pytest.mark.slow  # builds a model or runs a subprocess
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_gradient_pass_reads_the_weights_it_ran_with(tmp_path, monkeypatch, dtype):
    """`current` gives where(mask, base, tuned) as stored, kept graphs or recomputed layers: from the
    live parameters when the compute dtype holds the stored values (fp32), from the files when it
    does not (bf16 compute of an fp32 checkpoint)."""
    from transformers import AutoConfig, AutoTokenizer

    from surgeon.data.batches import prompt_batches
    from surgeon.engine.layered import TUNED, LayeredModel
    from surgeon.engine.store import SpillStore
    from surgeon.io.checkpoint import SafetensorsCheckpoint
    from surgeon.io.references import resolve_model
    from surgeon.tiny import make_pair

    llama = make_pair(tmp_path / "fp32", "llama", dtype=torch.float32)
    base, tuned = resolve_model(str(llama[0])).tensors, resolve_model(str(llama[1])).tensors
    config = AutoConfig.from_pretrained(llama[1])
    batches = prompt_batches(AutoTokenizer.from_pretrained(llama[1]), HARMFUL, 4)
    gathers = []
    gather = SafetensorsCheckpoint.gather
    monkeypatch.setattr(SafetensorsCheckpoint, "gather", lambda self, name, indices: gathers.append(name) or gather(self, name, indices))
    for budget in (10**9, 1):
        engine = LayeredModel(config, base, tuned, SpillStore(budget, tmp_path / str(budget)), dtype=dtype)
        scope = engine.layout.scope(3)
        plan = MaskSet({n: tuned.shape(n) for layer in scope for n in layer})
        generator = torch.Generator().manual_seed(0)
        for name in plan.names():
            plan.set(name, torch.randperm(plan.get(name).numel(), generator=generator)[:5].sort().values)
        seen = []

        def on_layer(raw, grads):
            for name in scope[raw.index]:
                indices = torch.arange(0, grads[name].numel(), 3)
                expected = torch.where(plan.get(name), base.get(name), tuned.get(name)).flatten()[indices]
                gathers.clear()
                assert torch.equal(raw.current.gather(name, indices).to(expected.dtype), expected), name
                assert (gathers == []) == (dtype == torch.float32), name
                seen.append(name)

        engine.gradient_pass(engine.prepare(batches, TUNED, 3), plan, TowardDirection(torch.ones(config.hidden_size)), 3, scope, on_layer)
        assert sorted(seen) == sorted(plan.names())


def test_spilling_to_disk_gives_the_same_masks(llama, write_recipe, tmp_path):
    in_memory = run(load_recipe(write_recipe(*llama, name="a.yaml", output={"path": str(tmp_path / "a")}))).dump()
    spilled = run(load_recipe(write_recipe(*llama, name="b.yaml", output={"path": str(tmp_path / "b")}, compute={"max_memory": 1024}))).dump()
    assert in_memory["memory"]["spilled_bytes"] == 0 and spilled["memory"]["spilled_bytes"] > 0
    a, b = MaskSet.load(tmp_path / "a" / "masks.safetensors"), MaskSet.load(tmp_path / "b" / "masks.safetensors")
    assert all(torch.equal(a.get(n), b.get(n)) for n in a.names())


def test_balanced_answer_loss_rollback_matches_reference(llama, write_recipe, task_eval_file, tmp_path):
    """data.task.balance answers: every distinct answer weighs the same in rollback's loss (the
    tiny task repeats some answers, so the reverted entries differ from the token-weighted ones)."""
    base, tuned = llama
    recipe = write_recipe(base, tuned, rollback={"mode": "always", "objective": "answer_loss"},
                          data={"harmful": {"prompts": HARMFUL}, "task": {"path": str(task_eval_file), "answer_field": "response", "balance": "answers"}})
    run(load_recipe(recipe)).dump()
    masks = MaskSet.load(tmp_path / "repaired" / "masks.safetensors")
    common = dict(layer=4, sparsity=0.01, steps=3, rollback=True, batch_size=4, answers=ANSWERS)
    expected, _ = reference_repair(base, tuned, HARMFUL, TASK, balance="answers", **common)
    by_tokens, _ = reference_repair(base, tuned, HARMFUL, TASK, **common)
    assert all(torch.equal(masks.get(name), mask) for name, mask in expected.items())
    assert any(not torch.equal(by_tokens[name], mask) for name, mask in expected.items())


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt_neox"])
@pytest.mark.parametrize("balance", ["tokens", "answers"])
def test_streamed_task_loss_equals_the_whole_model_loss(model_pairs, tmp_path, arch, balance):
    """Teacher-forced answer NLL through the layered engine vs the model's own full forward: the
    mean over every answer token, or (balance answers) the mean over distinct answers of the mean
    over their tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from surgeon.data.batches import answer_batches
    from surgeon.engine.layered import TUNED, LayeredModel
    from surgeon.engine.store import SpillStore
    from surgeon.evaluation.streamed import TaskLoss
    from surgeon.io.references import resolve_model
    from surgeon.tiny import ANSWERS

    base_dir, tuned_dir = model_pairs[arch]
    tokenizer = AutoTokenizer.from_pretrained(tuned_dir)
    batches = answer_batches(tokenizer, TASK, ANSWERS, batch_size=5, balance=balance)
    base, tuned = resolve_model(str(base_dir)), resolve_model(str(tuned_dir))
    engine = LayeredModel(AutoConfig.from_pretrained(tuned_dir), base.tensors, tuned.tensors, SpillStore(10**9, tmp_path))
    streamed = TaskLoss(engine, batches)(TUNED)

    model = AutoModelForCausalLM.from_pretrained(tuned_dir, dtype=torch.float32).eval()
    rows = []  # per row: (answer, NLL summed over its answer tokens, their count)
    with torch.no_grad():
        for batch in batches:
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids).logits
            for row_logits, labels in zip(logits[:, :-1], batch.labels[:, 1:]):
                keep = labels != -100
                rows.append((torch.nn.functional.cross_entropy(row_logits[keep], labels[keep], reduction="sum").item(), int(keep.sum())))
    rows = [(answer, *row) for answer, row in zip(ANSWERS, rows)]
    if balance == "tokens":
        expected = sum(nll for _, nll, _ in rows) / sum(count for *_, count in rows)
    else:
        groups = {answer: [r for r in rows if r[0] == answer] for answer in ANSWERS}
        means = [sum(nll for _, nll, _ in g) / sum(count for *_, count in g) for g in groups.values()]
        expected = sum(means) / len(means)
        assert len(groups) < len(ANSWERS)
    assert sum(count for *_, count in rows) > len(TASK) and streamed == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow  # builds a model or runs a subprocess
def test_bf16_checkpoints_repair_bit_exactly_and_match_the_reference(tmp_path, write_recipe):
    """Stored bf16, computed in fp32: the same entries as the reference, copied as stored."""
    from surgeon.tiny import make_pair

    base, tuned = make_pair(tmp_path / "bf16", "qwen2", dtype=torch.bfloat16)
    report = run(load_recipe(write_recipe(base, tuned, rollback={"mode": "always"}))).dump()
    masks = MaskSet.load(tmp_path / "repaired" / "masks.safetensors")
    expected, _ = reference_repair(base, tuned, HARMFUL, TASK, layer=4, sparsity=0.01, steps=3, rollback=True, batch_size=4)
    assert all(torch.equal(masks.get(n), m) for n, m in expected.items()) and report["record"]["restored"]["total"] > 0
    base_t, tuned_t, out_t = checkpoint_tensors(base), checkpoint_tensors(tuned), checkpoint_tensors(tmp_path / "repaired")
    for name, value in out_t.items():
        assert value.dtype == torch.bfloat16
        want = torch.where(masks.get(name), base_t[name], tuned_t[name]) if name in expected else tuned_t[name]
        assert torch.equal(value, want), name


def test_output_dtype_casts_every_float_tensor_and_says_so_in_the_config(llama, write_recipe, tmp_path):
    run(load_recipe(write_recipe(*llama, output={"path": str(tmp_path / "repaired"), "dtype": "bfloat16"}))).dump()
    out = checkpoint_tensors(tmp_path / "repaired")
    assert {v.dtype for v in out.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "repaired" / "config.json").read_text())["dtype"] == "bfloat16"


def test_experts_are_restored_in_checkpoint_names_and_a_missing_expert_is_one_line(model_pairs, write_recipe, tmp_path):
    """Mixtral keeps one tensor per expert on disk and fuses them into 3-D parameters when it
    loads: masks and output speak the checkpoint's per-expert names; a checkpoint with fewer
    experts than config.json declares stops before any work, naming the fused parameter."""
    import shutil

    from click.testing import CliRunner

    from surgeon.cli import main

    base, tuned = model_pairs["mixtral"]
    run(load_recipe(write_recipe(base, tuned))).dump()
    names = MaskSet.load(tmp_path / "repaired" / "masks.safetensors").names()
    assert any(".block_sparse_moe.experts.3.w1.weight" in n for n in names) and not any("gate_up_proj" in n for n in names)

    wrong = tmp_path / "wrong"
    shutil.copytree(tuned, wrong)
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "num_local_experts": 5}))
    result = CliRunner().invoke(main, ["run", str(write_recipe(base, wrong, name="wrong.yaml", output={"path": str(tmp_path / "out")})), "-q"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "give shape (4, 96, 32), the model that config.json describes has (5, 96, 32)" in result.output, result.output


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_embedding_over_used_rows_equals_the_whole_embedding(model_pairs, tmp_path, arch):
    """A batch is embedded from the vocabulary rows it uses alone. qwen2's padding index (its pad
    token after the words, as Qwen's <|endoftext|> at 151643) lies past those rows, gemma3's (0,
    scaled embedding) within them: both give what the model's whole embedding gives, in the
    arithmetic's dtype (fp32) from bf16-stored rows, the scale included."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from surgeon.data.batches import prompt_batches
    from surgeon.engine.layered import TUNED, LayeredModel
    from surgeon.engine.store import SpillStore
    from surgeon.io.references import resolve_model

    base, tuned = model_pairs[arch]
    config = AutoConfig.from_pretrained(tuned)
    batches = prompt_batches(AutoTokenizer.from_pretrained(tuned), HARMFUL, 4)
    used = torch.unique(torch.cat([b.input_ids.flatten() for b in batches]))
    padding = config.pad_token_id
    assert padding in used.tolist() and (padding >= len(used)) == (arch == "qwen2")
    store = SpillStore(10**9, tmp_path / "store")
    engine = LayeredModel(config, resolve_model(str(base)).tensors, resolve_model(str(tuned)).tensors, store)
    prepared = engine.prepare(batches, TUNED, 2)
    whole = AutoModelForCausalLM.from_pretrained(tuned, dtype=torch.float32).get_input_embeddings()
    assert whole.padding_idx == padding
    with torch.no_grad():
        for i, batch in enumerate(batches):
            assert torch.equal(store.get(prepared.input_key(i)), whole(batch.input_ids))
