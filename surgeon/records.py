"""surgeon.json as typed records: written as the dump of `RunRecord`, read back through it.

A run's record is one frame for every method (tool, inputs, settings, what changed, the final
evaluation, time and memory), a `Tradeoff` for a method that scores checkpoints, and the method's
own `record`, a `MethodRecord` its package registers (restore: its steps and restored weights).
The report, the card, the console, the plot, the push gate and `surgeon pick` read these types,
never a method's dict keys. No torch here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, SerializeAsAny, ValidationError

from surgeon.errors import InputError

RECORD_VERSION = 2  # 1: the method's sections at the top level (surgeon 0.2)


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelScores(Record):
    """One model's row of an evaluation (evaluation/evaluator.py's Scores, as written)."""

    harmful_rate: float | None = None
    refused: float | None = None
    degenerate: float | None = None
    unparsable: int = 0
    harmful_by_category: dict[str, float] | None = None
    task_score: float | None = None
    harmful_interval: tuple[float, float] | None = None
    task_interval: tuple[float, float] | None = None
    over_refusal: float | None = None
    over_refusal_interval: tuple[float, float] | None = None
    kl_from_tuned: float | None = None
    seconds: float = 0.0
    generated_tokens: int = 0
    tokens_per_second: float | None = None
    restored: int | None = None  # weights taken from base: the repaired model of a mask repair
    change_from_first: dict[str, Any] | None = None  # `surgeon eval`: paired on the same rows as the first model
    examples: dict[str, list[dict]] | None = None  # `surgeon eval --show`: the rows answered


class Generation(Record):
    tokens: int = 0
    seconds: float = 0.0
    tokens_per_second: float | None = None


class Evaluation(Record):
    """What was measured, per model, and on which rows: a run's final table and `surgeon eval`'s."""

    judge: str | None = None
    safety_prompts: int = 0
    benign_prompts: int = 0
    metric: str | None = None
    higher_is_better: bool | None = None
    task_rows: int = 0
    models: dict[str, ModelScores] = {}
    generation: Generation = Generation()
    # a run's: which rows chose the checkpoint (held_out: the reported rows chose nothing), how
    # many reported harmful prompts also probed or chose, the answers report.md shows
    chosen_on: dict[str, str] | None = None
    held_out: bool | None = None
    safety_shared: dict[str, int] = {}
    examples: dict[str, dict[str, list[dict]]] = {}


class TradeoffCheckpoint(Record):
    step: int
    restored: int  # weights taken from base at this checkpoint
    share_of_N: float
    score: float | None  # the task score (None without evaluate.task)
    harmful_rate: float | None
    meets_floor: bool
    chosen: bool


class Tradeoff(Record):
    """The checkpoints a method scored and the one it wrote: what report.md's and the card's
    trade-off table, tradeoff.png, the push gate and `surgeon pick` read, for any method."""

    tuned: float | None  # tuned's task score on the same rows
    tuned_harmful_rate: float | None
    floor: float | None
    checkpoints: list[TradeoffCheckpoint]
    chosen_step: int | None  # None: no checkpoint met the floor (written anyway only when asked)
    chosen_by: str | None = None  # why the method stopped and how it chose, a sentence for report.md

    def choose(self, step: int) -> Tradeoff:
        return self.model_copy(update={"chosen_step": step, "checkpoints": [
            c.model_copy(update={"chosen": c.step == step}) for c in self.checkpoints]})


class MethodRecord(Record):
    """A method's own part of surgeon.json. A method's package subclasses it with its fields and
    the sections it adds to report.md, the card and the console; the defaults add nothing."""

    def report_sections(self, run: RunRecord) -> list[str]:
        """Markdown lines after report.md's trade-off table."""
        return []

    def card_sections(self, run: RunRecord) -> list[str]:
        """Markdown lines after the card's trade-off table."""
        return []

    def console_tables(self, run: RunRecord) -> list:
        """rich Tables `surgeon run` prints before the models table."""
        return []

    def summary_lines(self, run: RunRecord) -> list[str]:
        """Lines `surgeon run` prints after the tables."""
        return []


class Changed(Record):
    tensors: int
    parameters: int
    share_of_N: float  # of the decoder parameters


class Output(Record):
    shards: list[str]  # [] when the output is a patch
    folder: str


class RunRecord(Record):
    """surgeon.json of a `surgeon run` (and of `surgeon pick`, which rewrites one)."""

    format: Literal["surgeon.run"] = "surgeon.run"
    version: Literal[2] = RECORD_VERSION
    tool: dict[str, Any]
    recipe_sha256: str
    method: str
    inputs: dict[str, dict[str, Any]]
    settings: dict[str, Any]
    decoder_parameters_N: int
    change: str
    changed: Changed
    tradeoff: Tradeoff | None = None
    record: SerializeAsAny[MethodRecord] | None = None  # of the method's registered type, dumped as that type
    evaluation: Evaluation | None = None
    seconds: dict[str, float]
    peak_memory: dict[str, int]
    memory: dict[str, Any]
    output: Output
    picked: dict[str, Any] | None = None  # set by `surgeon pick`
    pushed: str | None = None

    @property
    def harm_measured(self) -> bool:
        return bool(self.evaluation and self.evaluation.judge)

    def dump(self) -> dict:
        return self.model_dump(mode="json")

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.dump(), indent=2) + "\n")

    @classmethod
    def of(cls, data: dict) -> RunRecord:
        """A record from its dump: the method's part as the type its registered spec declares."""
        from surgeon.methods.registry import methods

        spec = methods().get(data.get("method"))
        own = data.get("record")
        if own is not None:
            try:
                data = {**data, "record": (spec.record if spec and spec.record else MethodRecord).model_validate(own)}
            except ValidationError as exc:  # located in surgeon.json, not in the method's record alone
                raise ValidationError.from_exception_data(cls.__name__, [
                    {"type": e["type"], "loc": ("record", *e["loc"]), "input": e["input"], **({"ctx": e["ctx"]} if "ctx" in e else {})}
                    for e in exc.errors()]) from None
        return cls.model_validate(data)


class ApplyRecord(Record):
    """surgeon.json of a checkpoint `surgeon apply` wrote from a patch (nothing evaluated)."""

    format: Literal["surgeon.apply"] = "surgeon.apply"
    version: Literal[2] = RECORD_VERSION
    tool: dict[str, Any]
    method: Literal["apply"] = "apply"
    patch: dict[str, Any]  # the patch's method, kind and the surgeon that made it
    inputs: dict[str, dict[str, Any]]
    restored: int | None  # weights taken from base (a mask patch); None for a patch of tensors
    tensors: int
    forced: bool  # applied to models the patch was not made from
    mismatches: list[str]
    output: Output

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=2) + "\n")


def read_record(folder: Path) -> RunRecord | ApplyRecord:
    """The surgeon.json of a finished output (a run's, or `surgeon apply`'s), or one line saying
    why it cannot be read."""
    path = Path(folder) / "surgeon.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        raise InputError("not a finished surgeon output (no readable surgeon.json)", str(folder)) from None
    kinds = {"surgeon.run": RunRecord.of, "surgeon.apply": ApplyRecord.model_validate}
    if not isinstance(data, dict) or data.get("format") not in kinds:
        raise InputError("surgeon.json is not a record this surgeon reads (written before surgeon 0.3? run again)", str(path))
    try:
        return kinds[data["format"]](data)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise InputError(f"surgeon.json does not read as a {data['format']} record: {where}: {error['msg']}", str(path)) from None


def read_run_record(folder: Path) -> RunRecord:
    """A run's record (`surgeon pick` rewrites one), or one line saying why this is not one."""
    record = read_record(folder)
    if not isinstance(record, RunRecord):
        raise InputError("this output was written by `surgeon apply`, not by a run", str(folder))
    return record
