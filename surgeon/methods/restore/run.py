"""The restore method of docs/method.md (Yang et al., IEEE S&P 2025), step by step.

State is a MaskSet: theta = where(mask, base, tuned) for each in-scope tensor.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from surgeon.engine.layered import BASE, TUNED, LayerTensors, LayeredModel, Plan, PreparedInputs
from surgeon.engine.masks import MaskSet
from surgeon.engine.objectives import AnswerLoss, Objective, TowardDirection
from surgeon.engine.store import SpillStore
from surgeon.engine.topk import Selection, StreamingTopK, beyond, collect, top, true_at
from surgeon.io.checkpoint import check_finite
from surgeon.io.run_state import RunState
from surgeon.io.writer import TensorEntry
from surgeon.methods.interface import Repair
from surgeon.methods.restore.record import RestoreRecord, chosen_by
from surgeon.progress import NullProgress, Progress
from surgeon.records import Tradeoff, TradeoffCheckpoint


class CheckpointScorer(Protocol):
    """Scores a model state: the task metric (for the gate) and, when configured, the harmful rate."""

    name: str
    higher_is_better: bool
    absolute_drop: bool  # the floor is S0 -/+ max_task_drop, not a relative drop (metrics where tuned scores 0)

    def task(self, plan: Plan) -> float: ...

    def harm(self, plan: Plan) -> float | None: ...


@dataclass(frozen=True)
class RestoreSettings:
    probe_layer: int
    budget: int
    steps: int = 20
    warmup: int = 5
    save_every: int = 5
    rollback_mode: str = "auto"
    rollback_ratio: float = 0.2
    max_task_drop: float = 0.05
    select: str = "last_within_floor"
    stop_at_harmful_rate: float | None = None
    stop_patience: int | None = None


@dataclass(frozen=True)
class RollbackPass:
    """What rollback's gradient pass runs on: the task inputs, how many layers deep, and toward what
    (`objective` None: the paper's task direction, from the same inputs when a rollback first needs it)."""

    task: PreparedInputs
    layers: int
    objective: Objective | None = None


@dataclass
class StepRecord:
    step: int
    phase: str
    restored: int
    reverted: int
    total_restored: int
    harm_cosine: float
    seconds: float


@dataclass
class Checkpoint:
    step: int
    path: Path
    restored: int
    score: float | None = None
    harmful_rate: float | None = None
    meets_floor: bool = True


@dataclass
class RepairResult:
    tuned_score: float | None
    tuned_harm: float | None
    floor: float | None
    rollback_used: bool
    warmup_score: float | None
    steps: list[StepRecord] = field(default_factory=list)
    checkpoints: list[Checkpoint] = field(default_factory=list)
    chosen: Checkpoint | None = None
    stopped: str = "steps"  # why the schedule ended: steps (the cap), stop_at, patience, or floor


# why a schedule ended, as the log says it (formatted with the settings)
_STOP_LOG = {"floor": "the task score is past the floor", "stop_at": "harmful rate at most {s.stop_at_harmful_rate:.1%}",
             "patience": "{s.stop_patience} checkpoints in a row without a lower harmful rate"}


class RestoreMethod:
    """method.md's schedule over the engine; `rollback` is what rollback learns from (the task
    prompts for the first E layers and the task direction, or prompt+answer batches through every
    layer and their answers' loss)."""

    def __init__(
        self,
        engine: LayeredModel,
        scope: list[list[str]],
        harmful_on_base: PreparedInputs,
        harmful: PreparedInputs,
        rollback: RollbackPass,
        settings: RestoreSettings,
        workdir: Path,
        gradient_store: SpillStore,
        scorer: CheckpointScorer | None = None,
        progress: Progress = NullProgress(),
        state: RunState | None = None,
    ):
        self.engine, self.scope, self.settings, self.scorer, self.state = engine, scope, settings, scorer, state
        self.harmful_on_base, self.harmful, self.rollback = harmful_on_base, harmful, rollback
        self.workdir, self.progress = Path(workdir), progress
        self.workdir.mkdir(parents=True, exist_ok=True)
        # tensor ids in (layer, name) order: the order in which equal gradients rank in the top-k
        self.names = [name for layer in scope for name in sorted(layer)]
        self.tensor_ids = {name: i for i, name in enumerate(self.names)}
        self.accumulated = gradient_store
        self.v_harm: torch.Tensor | None = None
        self.v_task: torch.Tensor | None = None

    def empty_masks(self) -> MaskSet:
        return MaskSet({name: self.engine.tuned.shape(name) for name in self.names})

    # -- Directions (computed once) --------------------------------------------------------

    def compute_directions(self) -> None:
        """v_harm: mean h(x) over H with base. v_task (mean h(x) over T with tuned) waits until a
        rollback needs it: a run that never rolls back never computes it."""
        E = self.settings.probe_layer
        self.v_harm = check_finite("direction v_harm", self.engine.last_token_states(self.harmful_on_base, BASE, E, "direction v_harm (base)").mean(0), "data.harmful")

    def task_direction(self) -> torch.Tensor:
        if self.v_task is None:
            E = self.settings.probe_layer
            self.v_task = check_finite("direction v_task", self.engine.last_token_states(self.rollback.task, TUNED, E, "direction v_task (tuned)").mean(0), "data.task")
        return self.v_task

    # -- Restore step ----------------------------------------------------------------------

    def restore_step(self, masks: MaskSet, accumulate: bool, description: str, last: bool = False) -> tuple[dict[str, torch.Tensor], float]:
        """Restore the k candidates with the largest |g|; return the entries restored and the loss.
        With `accumulate`, g includes the earlier steps' gradients, and is kept for the next step
        unless this is the `last` (nothing would read it: its memory and the saved state's disk are spared)."""
        best = StreamingTopK(self.settings.budget)

        def on_layer(raw: LayerTensors, grads: dict[str, torch.Tensor]) -> None:
            for name in self.scope[raw.index]:
                g = grads[name]
                if accumulate and not last:
                    self.accumulated.put(name, g)
                # a candidate: theta - base nonzero (so not restored yet: theta is base there) and of
                # g's sign (compared by sign bit)
                if best.threshold is None:
                    diff = raw.current[name].to(g.device, torch.float32, copy=True).sub_(raw.base[name].to(g.device))
                    indices = true_at((diff != 0) & (g != 0) & (torch.signbit(diff) == torch.signbit(g))).to(g.device)
                    del diff
                    scores = g.flatten()[indices]
                else:
                    # entries at or below the top-k's threshold would be dropped on arrival: the few
                    # above it are tested alone (the same candidates, a third of the time)
                    indices = beyond(g, best.threshold).to(g.device)
                    at = indices.cpu()
                    scores = g.reshape(-1).index_select(0, indices)  # twice as fast as g.flatten()[indices]
                    diff = raw.current.gather(name, at).to(g.device, torch.float32) - raw.base.gather(name, at).to(g.device, torch.float32)
                    keep = true_at((diff != 0) & (torch.signbit(diff) == torch.signbit(scores))).to(g.device)
                    indices, scores = indices.index_select(0, keep), scores.index_select(0, keep)
                best.offer(self.tensor_ids[name], scores.abs(), indices)

        take = self.accumulated.pop if last else self.accumulated.get
        seed = (lambda name: take(name) if name in self.accumulated else None) if accumulate else (lambda name: None)
        loss = self.engine.gradient_pass(
            self.harmful, masks, TowardDirection(self.v_harm), self.settings.probe_layer, self.scope, on_layer, seed, description
        )
        restored = {self.names[t]: idx for t, idx in best.result().by_tensor().items()}
        for name, indices in restored.items():
            masks.set(name, indices)
        return restored, -loss / len(self.harmful.batches)

    # -- Rollback step ---------------------------------------------------------------------

    def rollback_step(self, masks: MaskSet, restored: dict[str, torch.Tensor], description: str) -> int:
        """Revert the top ratio of this step's restored entries whose task gradient pulls back to tuned."""
        parts: list[Selection] = []

        def on_layer(raw: LayerTensors, grads: dict[str, torch.Tensor]) -> None:
            for name in self.scope[raw.index]:
                indices = restored.get(name)
                if indices is None or indices.numel() == 0:
                    continue
                g = grads[name].flatten()[indices.to(grads[name].device)].float().cpu()
                diff = raw.base.gather(name, indices).float() - raw.tuned.gather(name, indices).float()  # theta - tuned
                candidates = (torch.sign(diff) == torch.sign(g)) & (diff != 0)
                parts.append(Selection(g[candidates].abs(), torch.full((int(candidates.sum()),), self.tensor_ids[name]), indices[candidates]))

        objective, layers = self.rollback.objective or TowardDirection(self.task_direction()), self.rollback.layers
        scope = self.scope + [[] for _ in range(layers - len(self.scope))]  # the layers above E have nothing in scope
        self.engine.gradient_pass(self.rollback.task, masks, objective, layers, scope, on_layer, description=description)
        candidates = collect(parts)
        chosen = top(candidates, math.ceil(self.settings.rollback_ratio * candidates.values.numel()))
        for t, indices in chosen.by_tensor().items():
            masks.clear(self.names[t], indices)
        return chosen.values.numel()

    # -- Schedule and gate -----------------------------------------------------------------

    def _meets_floor(self, score: float, floor: float | None) -> bool:
        if floor is None:
            return True
        return score >= floor if self.scorer.higher_is_better else score <= floor

    def _stop_reason(self, checkpoint: Checkpoint, result: RepairResult) -> str | None:
        """The schedule ends at the target harm (within the floor), when the floor binds (more steps
        restore more, and cannot bring the task back), or, with a patience, when that many
        checkpoints in a row within the floor lowered the harm no further."""
        if not checkpoint.meets_floor:
            return "floor"
        if self._at_target(checkpoint):
            return "stop_at"
        patience = self.settings.stop_patience
        rates = [c.harmful_rate for c in result.checkpoints if c.meets_floor and c.harmful_rate is not None]
        if patience is not None and len(rates) > patience and min(rates[-patience:]) >= min(rates[:-patience]):
            return "patience"
        return None

    def _at_target(self, checkpoint: Checkpoint) -> bool:
        target = self.settings.stop_at_harmful_rate
        return target is not None and checkpoint.harmful_rate is not None and checkpoint.harmful_rate <= target

    def _ends_after(self, segment: str, step: int, result: RepairResult) -> str | None:
        """Why the schedule ends at this step's checkpoint (the latest: a step that saved state made
        one), if it does (never in the warm-up, whose end decides the next segment; at the last
        step the cap ends it anyway)."""
        if segment == "warmup" or self.scorer is None or step >= self.settings.steps:
            return None
        return self._stop_reason(result.checkpoints[-1], result)

    def _run_steps(self, masks: MaskSet, first: int, last: int, segment: str, result: RepairResult) -> bool:
        """Steps first..last of a segment; True when a checkpoint met the stop rule (the warm-up runs
        whole: its end decides between restore-only and a restart with rollback)."""
        s, rollback = self.settings, segment == "rollback"
        for step in range(first, last + 1):
            started = time.perf_counter()
            phase = "restore+rollback" if rollback else "restore-only"
            restored, cosine = self.restore_step(masks, accumulate=not rollback, description=f"step {step}/{s.steps} restore", last=step == s.steps)
            reverted = self.rollback_step(masks, restored, f"step {step}/{s.steps} rollback") if rollback else 0
            record = StepRecord(step, phase, sum(int(i.numel()) for i in restored.values()), reverted, masks.count(), cosine, time.perf_counter() - started)
            result.steps.append(record)
            self.progress.log(
                f"step {step}: restored {record.restored:,}, reverted {reverted:,}, total {record.total_restored:,} "
                f"(cos to v_harm before step {cosine:.4f})"
            )
            if step % s.save_every == 0 or step == s.steps:
                checkpoint = self._checkpoint(masks, step, result, segment)
                self._save_state(segment, step, checkpoint, result)
                reason = self._ends_after(segment, step, result)
                if reason is not None:
                    result.stopped = reason
                    self.progress.log(f"stopping after step {step}: " + _STOP_LOG[reason].format(s=s))
                    return True
        return False

    def _checkpoint(self, masks: MaskSet, step: int, result: RepairResult, segment: str) -> Checkpoint:
        # named by segment too: a rollback restart's step 2 must not overwrite the warm-up's, which a saved state may name
        path = self.workdir / f"checkpoint-{segment}-{step}.safetensors"
        if self.engine.collective.is_main:  # the saved state's folder is shared by the processes of a data-parallel run
            masks.save(path)
        self.engine.collective.barrier()
        checkpoint = Checkpoint(step, path, masks.count())
        if self.scorer is not None:
            checkpoint.score = self.scorer.task(masks)
            checkpoint.harmful_rate = self.scorer.harm(masks)
            checkpoint.meets_floor = self._meets_floor(checkpoint.score, result.floor)
            harm = "" if checkpoint.harmful_rate is None else f", harmful rate {checkpoint.harmful_rate:.1%}"
            self.progress.log(
                f"checkpoint {step}: task {self.scorer.name} {checkpoint.score:.4f} "
                f"({'within' if checkpoint.meets_floor else 'past'} the floor){harm}"
            )
        result.checkpoints.append(checkpoint)
        return checkpoint

    def _select(self, within: list[Checkpoint]) -> Checkpoint | None:
        """last_within_floor: the latest; lowest_harm_within_floor: the least harmful, later on ties
        (the latest when no checkpoint's harm was measured)."""
        if not within:
            return None
        measured = [c for c in within if c.harmful_rate is not None]
        if self.settings.select == "lowest_harm_within_floor" and measured:
            return min(reversed(measured), key=lambda c: c.harmful_rate)
        return within[-1]

    # -- Saved state: a killed run resumes from its last checkpoint ---------------------------

    def _save_state(self, segment: str, step: int, checkpoint: Checkpoint, result: RepairResult) -> None:
        if self.state is None:
            return
        record = {
            "sequence": (self.state.saved or {}).get("sequence", 0) + 1, "segment": segment, "step": step,
            "masks": checkpoint.path.name, "result": _result_record(result),
        }
        directions = {key: value for key, value in (("v_harm", self.v_harm), ("v_task", self.v_task)) if value is not None}
        entries = [TensorEntry(key, tuple(value.shape), value.dtype) for key, value in directions.items()]
        entries += [TensorEntry(f"grad/{name}", *self.accumulated.describe(name)) for name in self.names if name in self.accumulated]
        # the accumulated gradients (one float per in-scope weight) are read back one at a time, never all at once
        get = lambda key: directions[key] if key in directions else self.accumulated.get(key.removeprefix("grad/"))
        self.state.save(record, entries, get)

    def _resume(self) -> tuple[RepairResult, MaskSet, str, int]:
        saved = self.state.saved
        for key, value in self.state.tensors():
            if key.startswith("grad/"):
                self.accumulated.put(key.removeprefix("grad/"), value)
            elif key in ("v_harm", "v_task"):
                setattr(self, key, value)
        self.progress.log(f"resuming after step {saved['step']} ({saved['segment']}), from the saved state of an earlier run "
                          "of this recipe on these inputs; --fresh starts over")
        return _result_from(saved["result"], self.workdir), MaskSet.load(self.workdir / saved["masks"]), saved["segment"], saved["step"]

    # -- The schedule: segments, so that a saved state can resume in any of them -------------

    def _start(self) -> tuple[RepairResult, MaskSet, str, int]:
        s = self.settings
        self.compute_directions()
        tuned_score = tuned_harm = floor = None
        if self.scorer is not None:
            tuned_score, tuned_harm = self.scorer.task(TUNED), self.scorer.harm(TUNED)
            drop = s.max_task_drop if self.scorer.absolute_drop else abs(tuned_score) * s.max_task_drop
            floor = tuned_score - drop if self.scorer.higher_is_better else tuned_score + drop
            self.progress.log(f"tuned task {self.scorer.name}: {tuned_score:.4f}, floor {floor:.4f}")
            if tuned_score == 0 and self.scorer.higher_is_better:
                self.progress.log(f"warning: tuned scores 0 on the task ({self.scorer.name}), so the floor protects nothing: "
                                  "check evaluate.task's rows, fields and metric")
        result = RepairResult(tuned_score, tuned_harm, floor, rollback_used=s.rollback_mode == "always", warmup_score=None)
        first = {"auto": "warmup", "never": "restore-only", "always": "rollback"}[s.rollback_mode]
        return result, self.empty_masks(), first, 0

    def _after_warmup(self, masks: MaskSet, result: RepairResult) -> tuple[str | None, int, MaskSet]:
        """The gate of method.md: the next segment, the step it starts after, and its masks."""
        s = self.settings
        scored = [c.score for c in result.checkpoints if c.step == s.warmup]
        result.warmup_score = scored[0] if scored else (self.scorer.task(masks) if s.warmup else result.tuned_score)
        if not self._meets_floor(result.warmup_score, result.floor):
            self.progress.log(f"warm-up task {self.scorer.name} {result.warmup_score:.4f} is past the floor: restarting from tuned with rollback")
            result.rollback_used = True
            result.checkpoints.clear()
            self.accumulated.clear()
            return "rollback", 0, self.empty_masks()
        if any(c.meets_floor and self._at_target(c) for c in result.checkpoints):
            result.stopped = "stop_at"  # the warm-up already reached the target within the floor
            return None, 0, masks
        return "restore-only", s.warmup, masks

    def run(self) -> RepairResult:
        s = self.settings
        if self.state is not None and self.state.saved:
            result, masks, segment, done = self._resume()
            # a run killed after its schedule had ended (in its final evaluation or write) ends there again
            reason = self._ends_after(segment, done, result)
            if reason is not None:
                result.stopped, segment = reason, None
        else:
            result, masks, segment, done = self._start()
        # the directions are known: inputs that only served them give their memory back
        self.engine.release(self.harmful_on_base)
        if s.rollback_mode == "never":
            self.engine.release(self.rollback.task)
        while segment is not None:
            stopped = self._run_steps(masks, done + 1, s.warmup if segment == "warmup" else s.steps, segment, result)
            segment, done, masks = self._after_warmup(masks, result) if segment == "warmup" and not stopped else (None, 0, masks)
        result.chosen = self._select([c for c in result.checkpoints if c.meets_floor])
        self.accumulated.clear()
        return result


def _result_record(result: RepairResult) -> dict:
    record = asdict(result)
    record["checkpoints"] = [{**c, "path": Path(c["path"]).name} for c in record["checkpoints"]]
    return record


def _result_from(record: dict, workdir: Path) -> RepairResult:
    steps = [StepRecord(**step) for step in record["steps"]]
    checkpoints = [Checkpoint(**{**c, "path": workdir / c["path"]}) for c in record["checkpoints"]]
    return RepairResult(**{**record, "steps": steps, "checkpoints": checkpoints, "chosen": None})


# -- As a registered method: built from the run context, returns a Repair -------------------

def masks_summary(masks: MaskSet, layout, probe_layer: int) -> tuple[str, dict, dict]:
    """What a mask repair changed: the sentence, `changed`, and the record's `restored` section."""
    restored, N = masks.count(), layout.decoder_parameters
    change = (f"{restored:,} weights ({restored / N:.4%} of the decoder parameters) restored from base, "
              f"chosen by gradient in decoder layers below {probe_layer} of {layout.num_layers}")
    changed = {"tensors": sum(1 for n in masks.names() if masks.count(n)), "parameters": restored, "share_of_N": restored / N}
    return change, changed, {"total": restored, "share_of_N": restored / N, **restored_breakdown(masks, layout)}


def restored_breakdown(masks: MaskSet, layout) -> dict:
    by_layer, by_module = Counter(), Counter()
    for name in masks.names():
        count = masks.count(name)
        index, inside = layout.layer_of(name)
        by_layer[index] += count
        by_module[inside.removesuffix(".weight").removesuffix(".bias")] += count
    return {"by_layer": dict(sorted(by_layer.items())), "by_module": dict(sorted(by_module.items()))}


class RestoreRun:
    """restore as a registered method."""

    def __init__(self, context):
        recipe, pair = context.recipe, context.pair
        self.context = context
        probe_layer, layout = context.probe_layer, pair.layout
        self.settings = RestoreSettings(
            probe_layer=probe_layer, budget=layout.budget(recipe.restore.sparsity), steps=recipe.restore.steps,
            warmup=recipe.restore.warmup, save_every=recipe.restore.save_every, rollback_mode=recipe.restore.rollback.mode,
            rollback_ratio=recipe.restore.rollback.ratio, max_task_drop=recipe.restore.rollback.max_task_drop, select=recipe.evaluate.selection,
            stop_at_harmful_rate=recipe.restore.stop_at.harmful_rate if recipe.restore.stop_at else None,
            stop_patience=recipe.restore.stop_at.patience if recipe.restore.stop_at else None,
        )
        engine, inputs = pair.engine, context.inputs
        harmful = context.prompt_batches(inputs.harmful)
        if recipe.restore.rollback.objective == "answer_loss":  # prompts and answers, through every layer to the head
            L = layout.num_layers
            rollback = RollbackPass(engine.prepare(context.answer_batches(inputs.task, inputs.task_answers), TUNED, L), L, AnswerLoss())
        else:
            rollback = RollbackPass(engine.prepare(context.prompt_batches(inputs.task), TUNED, probe_layer), probe_layer)
        self.method = RestoreMethod(
            engine, layout.scope(probe_layer), engine.prepare(harmful, BASE, probe_layer), engine.prepare(harmful, TUNED, probe_layer),
            rollback, self.settings, context.state.checkpoints,
            context.spill_store("gradients"), context.scorer, context.progress, context.state,
        )

    def run(self) -> Repair:
        from surgeon.errors import TaskFloorError

        context, result = self.context, self.method.run()
        chosen = result.chosen
        if chosen is None:
            scores = ", ".join(f"step {c.step}: {c.score:.4f}" for c in result.checkpoints)
            if not context.recipe.output.write_below_floor:
                raise TaskFloorError(
                    f"every checkpoint fell past the task floor {result.floor:.4f} (tuned {result.tuned_score:.4f}; {scores}); "
                    "nothing written. Lower restore.sparsity or steps, raise restore.rollback.max_task_drop, or set output.write_below_floor",
                    "evaluate.task",
                )
            chosen = (max if context.scorer.higher_is_better else min)(result.checkpoints, key=lambda c: c.score)
            context.progress.log(f"no checkpoint met the floor; writing step {chosen.step}, the best task score, as asked")
        masks = MaskSet.load(chosen.path)
        layout, inputs = context.pair.layout, context.inputs
        change, changed, restored = masks_summary(masks, layout, self.settings.probe_layer)
        N = layout.decoder_parameters
        return Repair(
            change=change,
            settings={**asdict(self.settings), "rollback_objective": context.recipe.restore.rollback.objective, "harmful_prompts": len(inputs.harmful), "task_prompts": len(inputs.task)},
            changed=changed,
            masks=masks, masks_metadata={"step": str(chosen.step)},
            checkpoints={c.step: c.path for c in result.checkpoints},
            tradeoff=Tradeoff(
                tuned=result.tuned_score, tuned_harmful_rate=result.tuned_harm, floor=result.floor,
                checkpoints=[TradeoffCheckpoint(step=c.step, restored=c.restored, share_of_N=c.restored / N, score=c.score,
                                                harmful_rate=c.harmful_rate, meets_floor=c.meets_floor, chosen=c is result.chosen)
                             for c in result.checkpoints],
                chosen_step=result.chosen.step if result.chosen else None,
                chosen_by=chosen_by(result.stopped, self.settings.steps, self.settings.select),
            ),
            record=RestoreRecord(restored=restored, steps=[asdict(step) for step in result.steps], warmup=result.warmup_score,
                                 rollback_used=result.rollback_used, stopped=result.stopped),
        )
