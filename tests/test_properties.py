"""Property tests for the selection and mask code the method's correctness rests on."""

import math
from unittest.mock import patch

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from surgeon.engine import topk
from surgeon.engine.masks import MaskSet
from surgeon.engine.topk import StreamingTopK, beyond, collect, kth_largest, top, true_at, Selection
from surgeon.io.writer import TensorEntry, plan_shards

values = st.lists(st.floats(0, 8, allow_nan=False, width=32).map(lambda v: round(v, 1)), min_size=0, max_size=40)
signed = st.lists(st.floats(-8, 8, width=32).map(lambda v: round(v, 1)) | st.sampled_from([float("inf"), -float("inf"), -0.0]),
                  min_size=0, max_size=40)


@settings(max_examples=200, deadline=None)
@given(chunks=st.lists(values | signed, min_size=1, max_size=6), k=st.integers(0, 60), data=st.data())
def test_streaming_topk_equals_a_stable_sort_by_tensor_and_index(chunks, k, data):
    """Including ties (values are rounded so they repeat): of equal values the lower tensor id,
    then the lower index, wins, whatever order the tensors are offered in (the engine offers them
    from the last layer down); any sign and infinities (the selection offers |g|, but nothing here
    depends on it). `top`, over the candidates in any order, ranks them the same."""
    order = data.draw(st.permutations(range(len(chunks))))
    best = StreamingTopK(k)
    for tensor_id in order:
        best.offer(tensor_id, torch.tensor(chunks[tensor_id], dtype=torch.float32), torch.arange(len(chunks[tensor_id])))
    flat = [(float(np.float32(v)), t, i) for t, chunk in enumerate(chunks) for i, v in enumerate(chunk)]
    expected = sorted(flat, key=lambda e: -e[0])[:k]  # Python's sort is stable: (tensor id, index) order among equals
    got = best.result()
    assert sorted(zip(got.values.tolist(), got.tensor_ids.tolist(), got.indices.tolist()), key=lambda e: e[1:]) == sorted(expected, key=lambda e: e[1:])
    shuffled = data.draw(st.permutations(flat))
    ranked = top(Selection(torch.tensor([v for v, _, _ in shuffled]), torch.tensor([t for _, t, _ in shuffled], dtype=torch.long),
                           torch.tensor([i for _, _, i in shuffled], dtype=torch.long)), k)
    assert list(zip(ranked.values.tolist(), ranked.tensor_ids.tolist(), ranked.indices.tolist())) == expected


specials = st.sampled_from([0.0, -0.0, float("inf"), float("-inf"), 1e-45, -1e-45, 3.4e38, -3.4e38])


@settings(max_examples=300, deadline=None)
@given(numbers=st.lists(st.floats(allow_nan=False, width=32) | specials, min_size=1, max_size=60), data=st.data())
def test_kth_largest_is_the_kth_of_a_descending_sort(numbers, data):
    """Any sign, zeros of both signs, subnormals and infinities: the counting passes over the bit
    patterns order values as the numbers do."""
    k = data.draw(st.integers(1, len(numbers)))
    values = torch.tensor(numbers, dtype=torch.float32)
    assert kth_largest(values, k) == float(torch.sort(values, descending=True).values[k - 1])


@settings(max_examples=100, deadline=None)
@given(chunk=values, ratio=st.floats(0.01, 1.0))
def test_rollback_count_is_the_ceiling_of_the_ratio(chunk, ratio):
    candidates = collect([Selection(torch.tensor(chunk), torch.zeros(len(chunk), dtype=torch.long), torch.arange(len(chunk)))])
    chosen = top(candidates, math.ceil(ratio * len(chunk)))
    assert chosen.values.numel() == math.ceil(ratio * len(chunk))
    assert all(chosen.values[i] >= chosen.values[i + 1] for i in range(chosen.values.numel() - 1))


@settings(max_examples=100, deadline=None)
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=3), data=st.data())
def test_masks_set_clear_count_and_round_trip(tmp_path_factory, shape, data):
    size = math.prod(shape)
    masks = MaskSet({"w": tuple(shape)})
    on = data.draw(st.sets(st.integers(0, size - 1)))
    off = data.draw(st.sets(st.integers(0, size - 1)))
    masks.set("w", torch.tensor(sorted(on), dtype=torch.long))
    masks.clear("w", torch.tensor(sorted(off), dtype=torch.long))
    expected = torch.zeros(size, dtype=torch.bool)
    expected[list(on - off)] = True
    assert torch.equal(masks.get("w"), expected.reshape(shape)) and masks.count() == len(on - off)
    assert masks.indices("w").tolist() == sorted(on - off)
    probe = torch.tensor(data.draw(st.lists(st.integers(0, size - 1))), dtype=torch.long)
    assert torch.equal(masks.at("w", probe), expected[probe])
    path = tmp_path_factory.mktemp("m") / "masks.safetensors"
    masks.save(path)
    loaded = MaskSet.load(path)
    assert torch.equal(loaded.get("w"), masks.get("w")) and loaded.shapes == masks.shapes
    more = data.draw(st.sets(st.integers(0, size - 1)))  # a resumed run goes on setting bits, in its own copy
    before = masks.get("w").clone()
    loaded.set("w", torch.tensor(sorted(more), dtype=torch.long))
    expected[list(more)] = True
    assert torch.equal(loaded.get("w"), expected.reshape(shape)) and torch.equal(masks.get("w"), before)


@settings(max_examples=100, deadline=None)
@given(sizes=st.lists(st.integers(1, 50), min_size=1, max_size=30), budget=st.integers(4, 200))
def test_shard_plan_keeps_order_and_budget(sizes, budget):
    entries = [TensorEntry(f"t{i}", (s,), torch.float32) for i, s in enumerate(sizes)]
    shards = plan_shards(entries, budget)
    flat = [e for shard in shards.values() for e in shard]
    assert sorted(flat, key=entries.index) == entries  # each entry exactly once
    for shard in shards.values():
        assert len(shard) == 1 or sum(e.nbytes for e in shard) <= budget
        assert shard == sorted(shard, key=entries.index)
    if all(e.nbytes <= budget for e in entries):  # as before huggingface_hub planned it: in order
        assert flat == entries
    count = len(shards)
    assert list(shards) == (["model.safetensors"] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)])

def test_streaming_topk_ties_filling_one_bucket_keep_the_first_by_tensor_and_index():
    """Equal values share a bucket, so only an exact cut can let some go; offered from the highest
    tensor id down (as the backward offers layers), the lowest tensor's still win, and the
    threshold stays below their value so that they are not dropped on arrival."""
    best = StreamingTopK(3)
    for tensor_id in reversed(range(10)):
        best.offer(tensor_id, torch.full((20,), 0.5 if tensor_id % 2 else 0.0), torch.arange(20))
    got = best.result()
    assert got.tensor_ids.tolist() == [1, 1, 1] and got.indices.tolist() == [0, 1, 2] and best.threshold < 0.5


@settings(max_examples=200, deadline=None)
@given(entries=st.sets(st.tuples(st.integers(0, 4), st.integers(0, 30)), max_size=40), data=st.data())
def test_by_tensor_groups_each_tensors_indices_ascending(entries, data):
    """Whatever the order (grouped in offer order as the top-k returns it, or shuffled as rollback's
    top does), each tensor's selected indices come back once, ascending."""
    grouped = sorted(entries, key=lambda e: (-e[0], e[1]))  # tensors in a non-ascending offer order
    for order in (grouped, data.draw(st.permutations(grouped))):
        selection = Selection(torch.zeros(len(order)), torch.tensor([t for t, _ in order], dtype=torch.long),
                              torch.tensor([i for _, i in order], dtype=torch.long))
        got = {t: indices.tolist() for t, indices in selection.by_tensor().items()}
        assert got == {t: sorted(i for u, i in entries if u == t) for t in {t for t, _ in entries}}


@settings(max_examples=200, deadline=None)
@given(numbers=st.lists(st.floats(allow_nan=False, width=32) | specials, max_size=50), threshold=st.floats(0, 4, width=32),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]), chunk=st.sampled_from([1, 7, topk.CHUNK]))
def test_beyond_finds_the_entries_past_the_threshold(numbers, threshold, dtype, chunk):
    """numpy's path (float32/64/16, a chunk at a time) and torch's (bfloat16) both give |value| >
    threshold's indices, ascending, compared exactly (the threshold is not rounded to a
    half-precision gradient's dtype)."""
    values = torch.tensor(numbers, dtype=torch.float32).to(dtype)
    values = values.reshape(-1, 5) if len(numbers) % 5 == 0 else values
    expected = (values.double().abs() > threshold).flatten().nonzero().squeeze(1)
    with patch.object(topk, "CHUNK", chunk):
        assert torch.equal(beyond(values, threshold), expected)
    assert torch.equal(true_at(values.double().abs() > threshold), expected)
