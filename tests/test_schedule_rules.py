"""restore's schedule, gate, stop and choice rules against a fake engine and a scripted scorer: the
rules of method.md and the stop/choice settings, in milliseconds (tests/test_schedule.py runs a
few of the same through a whole `surgeon run`)."""

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings, strategies as st

from surgeon.engine.layered import TUNED
from surgeon.engine.store import SpillStore
from surgeon.methods.restore.run import RestoreMethod, RestoreSettings, RollbackPass
from surgeon.processes import SOLO

BUDGET, SIZE = 4, 4096


class Scorer:
    """Loss-like task scores (lower is better; tuned 1.0, floor 1.05): each new state gets the next
    listed score and harmful rate; the same state scores the same when asked again."""

    name, higher_is_better, absolute_drop = "loss", False, False

    def __init__(self, scores, harms=None):
        self.scores, self.harms, self.seen = iter(scores), iter(harms) if harms is not None else None, {}

    def _state(self, plan):
        if plan == TUNED:
            return 1.0, 0.9 if self.harms else None
        if plan.digest() not in self.seen:
            self.seen[plan.digest()] = (next(self.scores), next(self.harms) if self.harms else None)
        return self.seen[plan.digest()]

    def task(self, plan):
        return self._state(plan)[0]

    def harm(self, plan):
        return self._state(plan)[1]


class Scripted(RestoreMethod):
    """The schedule of RestoreMethod with its gradient passes replaced: a restore step sets the
    next BUDGET entries, a rollback step clears the first of them."""

    def compute_directions(self):
        self.passes = []

    def restore_step(self, masks, accumulate, description, last=False):
        self.passes.append(("restore", accumulate, last))
        start = masks.count()
        indices = torch.arange(start, start + BUDGET)
        masks.set("w", indices)
        return {"w": indices}, 0.5

    def rollback_step(self, masks, restored, description):
        self.passes.append(("rollback", None, None))
        masks.clear("w", restored["w"][:1])
        return 1


def schedule(tmp_path, scores, harms=None, **options):
    engine = SimpleNamespace(tuned=SimpleNamespace(shape=lambda name: (SIZE,)), release=lambda inputs: None, collective=SOLO)
    method = Scripted(engine, [["w"]], None, None, RollbackPass(None, 1), RestoreSettings(probe_layer=1, budget=BUDGET, **options),
                      tmp_path / "checkpoints", SpillStore(2**20, tmp_path / "spill"), Scorer(scores, harms))
    return method, method.run()


def test_a_warmup_within_the_floor_continues_restore_only_accumulating(tmp_path):
    method, result = schedule(tmp_path, [1.01, 1.02], steps=4, warmup=2, save_every=2)
    assert not result.rollback_used and result.warmup_score == 1.01
    assert [s.phase for s in result.steps] == ["restore-only"] * 4 and [s.total_restored for s in result.steps] == [4, 8, 12, 16]
    assert [c.step for c in result.checkpoints] == [2, 4] and result.chosen.step == 4 and result.stopped == "steps"
    # every restore-only step adds its gradient to the accumulated one; the last keeps none for a next step
    assert method.passes == [("restore", True, False)] * 3 + [("restore", True, True)]


def test_a_warmup_past_the_floor_restarts_from_tuned_with_rollback(tmp_path):
    method, result = schedule(tmp_path, [1.5, 1.04, 1.2], steps=4, warmup=2, save_every=2)
    assert result.rollback_used and result.warmup_score == 1.5
    assert [(s.step, s.phase) for s in result.steps] == [(1, "restore-only"), (2, "restore-only")] + [
        (i, "restore+rollback") for i in (1, 2, 3, 4)]
    assert result.steps[2].total_restored == BUDGET - 1  # restarted from tuned: nothing of the warm-up kept
    assert [(c.step, c.meets_floor) for c in result.checkpoints] == [(2, True), (4, False)] and result.chosen.step == 2
    assert ("rollback", None, None) in method.passes and all(not accumulate for kind, accumulate, _ in method.passes[2:] if kind == "restore")


def test_the_floor_binding_ends_the_schedule_at_the_first_checkpoint_past_it(tmp_path):
    _, result = schedule(tmp_path, [1.01, 1.03, 1.2, 1.04], steps=8, warmup=2, save_every=2)
    assert [(c.step, c.meets_floor) for c in result.checkpoints] == [(2, True), (4, True), (6, False)]
    assert result.stopped == "floor" and result.chosen.step == 4 and len(result.steps) == 6


def test_stop_at_ends_at_the_target_and_patience_when_harm_stops_falling(tmp_path):
    _, result = schedule(tmp_path / "a", [1.0] * 4, [0.5, 0.05, 0.0, 0.0], rollback_mode="never", warmup=0, steps=8, save_every=2,
                         stop_at_harmful_rate=0.1, select="lowest_harm_within_floor")
    assert [c.step for c in result.checkpoints] == [2, 4] and result.stopped == "stop_at" and result.chosen.step == 4
    _, result = schedule(tmp_path / "b", [1.0] * 6, [0.5, 0.2, 0.3, 0.2, 0.0, 0.0], rollback_mode="never", warmup=0, steps=12, save_every=2,
                         stop_at_harmful_rate=0.01, stop_patience=2, select="lowest_harm_within_floor")
    assert [c.step for c in result.checkpoints] == [2, 4, 6, 8] and result.stopped == "patience"
    assert result.chosen.step == 8  # the least harmful, the latest on ties


def test_no_checkpoint_within_the_floor_chooses_none(tmp_path):
    _, result = schedule(tmp_path, [1.2, 1.3], rollback_mode="never", warmup=0, steps=4, save_every=2)
    assert result.chosen is None and result.stopped == "floor" and [c.step for c in result.checkpoints] == [2]


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_the_choice_and_the_stop_follow_their_rules_for_any_scores(tmp_path_factory, data):
    steps, save_every = data.draw(st.integers(1, 8)), data.draw(st.integers(1, 3))
    rollback_mode = data.draw(st.sampled_from(["auto", "never", "always"]))
    warmup = data.draw(st.integers(0, steps)) if rollback_mode == "auto" else 0
    target, patience = data.draw(st.sampled_from([None, 0.0, 0.2])), data.draw(st.sampled_from([None, 1, 2]))
    select = data.draw(st.sampled_from(["last_within_floor", "lowest_harm_within_floor"]))
    scores = data.draw(st.lists(st.sampled_from([1.0, 1.04, 1.06, 1.5]), min_size=2 * steps + 2, max_size=2 * steps + 2))
    harms = data.draw(st.lists(st.sampled_from([0.0, 0.1, 0.2, 0.5]), min_size=2 * steps + 2, max_size=2 * steps + 2))
    _, result = schedule(tmp_path_factory.mktemp("s"), scores, harms, steps=steps, warmup=warmup, save_every=save_every, rollback_mode=rollback_mode,
                         stop_at_harmful_rate=target, stop_patience=patience if target is not None else None, select=select)
    within = [c for c in result.checkpoints if c.meets_floor]
    assert all(c.meets_floor == (c.score <= 1.05) for c in result.checkpoints)
    if not within:
        assert result.chosen is None
    elif select == "lowest_harm_within_floor":
        lowest = min(c.harmful_rate for c in within)
        assert result.chosen.harmful_rate == lowest and result.chosen is [c for c in within if c.harmful_rate == lowest][-1]
    else:
        assert result.chosen is within[-1]
    last = result.checkpoints[-1] if result.checkpoints else None
    if result.stopped == "floor":
        assert not last.meets_floor
    elif result.stopped == "stop_at":
        assert any(c.meets_floor and c.harmful_rate <= target for c in result.checkpoints)
    elif result.stopped == "steps":
        assert result.steps[-1].step == steps
    # past the gate the schedule never runs on from a checkpoint past the floor (the warm-up runs whole)
    assert all(c.meets_floor for c in result.checkpoints[:-1] if result.rollback_used or c.step > warmup)
    assert len(result.steps) <= steps + warmup


@pytest.mark.parametrize("rollback_mode, warmup", [("auto", 0), ("never", 2)])
def test_settings_that_skip_the_gate(tmp_path, rollback_mode, warmup):
    """No warm-up: the gate compares tuned with itself and continues restore-only; never: no gate."""
    _, result = schedule(tmp_path, [1.01, 1.02], rollback_mode=rollback_mode, warmup=warmup, steps=4, save_every=2)
    assert not result.rollback_used and [s.phase for s in result.steps] == ["restore-only"] * 4
