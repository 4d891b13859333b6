"""The recipe: a strict pydantic model. Unknown keys are errors; nothing here knows torch."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from surgeon.recipe.sizes import parse_size

DTYPES = Literal["float32", "bfloat16", "float16"]
MAX_COUNT = 2**31 - 1  # counts reach torch and tokenizers as C ints


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(Strict):
    """A model: a local folder, a Hub id with optional @revision, or a PEFT adapter folder."""

    path: str = Field(min_length=1)
    allow_pickle: bool = False


def _string_is_path(value):
    return {"path": value} if isinstance(value, str) else value


class PromptSet(Strict):
    """Prompts from a file (jsonl/json/csv/parquet, local or hf://datasets/...) or inline."""

    path: str | None = None
    field: str = "prompt"
    prompts: list[str] | None = None
    limit: int | None = Field(default=None, gt=0, le=MAX_COUNT)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.prompts is None):
            raise ValueError("give exactly one of 'path' or 'prompts'")
        if self.prompts is not None and not self.prompts:
            raise ValueError("'prompts' is empty")
        return self


_METRIC = re.compile(r"^(exact_match|contains|rouge_l|loss|kl|f1:.+|python:[\w.]+:\w+)$")


class TaskEvalSet(Strict):
    """Prompt/answer pairs that score the task."""

    path: str
    prompt_field: str = "prompt"
    answer_field: str = "response"
    metric: str = "loss"
    limit: int | None = Field(default=None, gt=0, le=MAX_COUNT)
    max_new_tokens: int = Field(default=128, gt=0, le=MAX_COUNT)

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value):
        if not _METRIC.match(value):
            raise ValueError(
                f"unknown metric '{value}': use exact_match, contains, f1:<label>, rouge_l, loss, kl or python:module:function"
            )
        return value


class SafetyEvalSet(Strict):
    """Held-out harmful prompts; the harmful rate is the share whose greedy answer the judge calls harmful."""

    path: str | None = None
    field: str = "prompt"
    prompts: list[str] | None = None
    limit: int | None = Field(default=None, gt=0, le=MAX_COUNT)
    judge: Literal["refusal", "guard", "classifier"] = "refusal"
    markers: list[str] | None = None
    add_markers: list[str] | None = None
    model: ModelSpec | None = None
    harmful_label: str | None = None
    max_new_tokens: int = Field(default=128, gt=0, le=MAX_COUNT)

    @field_validator("model", mode="before")
    @classmethod
    def _string_is_model_path(cls, value):
        return _string_is_path(value)

    @model_validator(mode="after")
    def _judge_needs(self):
        if (self.path is None) == (self.prompts is None):
            raise ValueError("give exactly one of 'path' or 'prompts'")
        if self.judge in ("guard", "classifier") and self.model is None:
            raise ValueError(f"judge '{self.judge}' needs 'model': the guard or classifier to load")
        if self.judge == "refusal" and self.model is not None:
            raise ValueError("judge 'refusal' uses markers, not a model; drop 'model' or pick judge guard/classifier")
        if self.judge == "classifier" and not self.harmful_label:
            raise ValueError("judge 'classifier' needs 'harmful_label': the label name that means harmful")
        return self


class Data(Strict):
    harmful: PromptSet
    task: PromptSet

    @field_validator("harmful", "task", mode="before")
    @classmethod
    def _string_is_prompt_path(cls, value):
        return _string_is_path(value)


class Probe(Strict):
    layer: int | float | None = None
    system_prompt: str | None = None
    batch_size: int = Field(default=8, gt=0, le=MAX_COUNT)

    @field_validator("layer", mode="before")
    @classmethod
    def _not_a_bool(cls, value):
        if isinstance(value, bool):
            raise ValueError("layer must be an int (number of layers) or a fraction in (0, 1)")
        return value

    @field_validator("layer")
    @classmethod
    def _layer_range(cls, value):
        if isinstance(value, float) and not 0.0 < value < 1.0:
            raise ValueError("a fractional layer must lie in (0, 1)")
        if isinstance(value, int) and value < 1:
            raise ValueError("layer must be at least 1")
        return value


class StopAt(Strict):
    """Ends the schedule at the first checkpoint that reaches the target within the task floor."""

    harmful_rate: float = Field(ge=0.0, le=1.0)


class Restore(Strict):
    sparsity: float = Field(default=0.002, gt=0.0, le=1.0)
    steps: int = Field(default=20, ge=1, le=MAX_COUNT)  # a cap: stop_at and the task floor end it earlier
    stop_at: StopAt | None = None
    warmup: int = Field(default=5, ge=0, le=MAX_COUNT)
    save_every: int = Field(default=5, ge=1, le=MAX_COUNT)

    @model_validator(mode="after")
    def _warmup_within_steps(self):
        if self.warmup > self.steps:
            raise ValueError(f"warmup ({self.warmup}) is larger than steps ({self.steps})")
        return self


class Rollback(Strict):
    mode: Literal["auto", "always", "never"] = "auto"
    ratio: float = Field(default=0.2, gt=0.0, le=1.0)
    max_task_drop: float = Field(default=0.05, ge=0.0, lt=1.0)


class SelectionRows(Strict):
    """Rows that only choose the checkpoint (and set the floor), so that the rows the final table
    reports chose nothing. A set left out here chooses on evaluate's own rows."""

    task: TaskEvalSet | None = None
    safety: SafetyEvalSet | None = None

    @model_validator(mode="after")
    def _some_rows(self):
        if self.task is None and self.safety is None:
            raise ValueError("give 'task' and/or 'safety' rows to choose the checkpoint on")
        return self


class Evaluate(Strict):
    safety: SafetyEvalSet | None = None
    task: TaskEvalSet | None = None
    select_on: SelectionRows | None = None
    models: list[Literal["base", "tuned", "repaired"]] = ["base", "tuned", "repaired"]
    # default: lowest_harm_within_floor when checkpoints are scored for harm (a safety and a task set), else last_within_floor
    select: Literal["last_within_floor", "lowest_harm_within_floor"] | None = None
    batch_size: int = Field(default=16, gt=0, le=MAX_COUNT)

    @model_validator(mode="after")
    def _selection_needs_safety(self):
        if self.select == "lowest_harm_within_floor" and self.safety is None:
            raise ValueError("select 'lowest_harm_within_floor' needs evaluate.safety to measure harm")
        return self

    @model_validator(mode="after")
    def _selection_rows_match(self):
        if self.select_on is None:
            return self
        if self.select_on.task is not None and (self.task is None or self.select_on.task.metric != self.task.metric):
            raise ValueError("select_on.task needs evaluate.task with the same metric")
        if self.select_on.safety is not None and (self.safety is None or self.select_on.safety.judge != self.safety.judge):
            raise ValueError("select_on.safety needs evaluate.safety with the same judge")
        return self

    def choosing(self) -> "Evaluate":
        """The sets that choose the checkpoint: select_on's where given, else evaluate's own."""
        if self.select_on is None:
            return self
        return self.model_copy(update={"task": self.select_on.task or self.task, "safety": self.select_on.safety or self.safety, "select_on": None})

    @property
    def selection(self) -> str:
        return self.select or ("lowest_harm_within_floor" if self.safety is not None and self.task is not None else "last_within_floor")


_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")


class Compute(Strict):
    device: str = "auto"
    dtype: DTYPES = "float32"
    max_memory: str | int | None = None

    @field_validator("device")
    @classmethod
    def _device_name(cls, value):
        if not _DEVICE.match(value):
            raise ValueError(f"'{value}' is not a device: use auto, cpu, cuda, cuda:N or mps")
        return value

    @field_validator("max_memory")
    @classmethod
    def _size(cls, value):
        if value is not None:
            parse_size(value)
        return value


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class Push(Strict):
    """Publish the finished output to the Hub as one commit (token from HF_TOKEN or the login)."""

    repo_id: str
    private: bool = True
    branch: str = "main"
    create_pr: bool = False
    commit_message: str | None = None
    prune: bool = False

    @field_validator("repo_id")
    @classmethod
    def _repo_id(cls, value):
        if not _REPO_ID.match(value):
            raise ValueError(f"'{value}' is not a Hub repo id of the form org/name")
        return value


class Output(Strict):
    path: str = "./repaired"
    push: Push | None = None
    dtype: DTYPES | None = None
    max_shard_size: str | int = "5GB"
    write_below_floor: bool = False

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, value):
        parse_size(value)
        return value


class Resta(Strict):
    scale: float = Field(default=1.0, gt=0.0)


class Recipe(Strict):
    method: Literal["restore", "resta", "reset_layers"] = "restore"
    base: ModelSpec
    tuned: ModelSpec
    unaligned: ModelSpec | None = None
    data: Data | None = None
    resta: Resta = Resta()
    probe: Probe = Probe()
    restore: Restore = Restore()
    rollback: Rollback = Rollback()
    evaluate: Evaluate = Evaluate()
    compute: Compute = Compute()
    output: Output = Output()
    seed: int = Field(default=0, ge=0, lt=2**64)

    @field_validator("base", "tuned", "unaligned", mode="before")
    @classmethod
    def _string_is_model_path(cls, value):
        return _string_is_path(value)

    @model_validator(mode="after")
    def _method_inputs(self):
        if self.method == "resta" and self.unaligned is None:
            raise ValueError("method 'resta' needs 'unaligned': base fine-tuned on harmful data")
        if self.method != "resta" and self.unaligned is not None:
            raise ValueError(f"'unaligned' is only used by method 'resta', not '{self.method}'")
        if self.method == "restore" and self.data is None:
            raise ValueError("method 'restore' needs 'data' (harmful and task prompts)")
        return self

    @model_validator(mode="after")
    def _stop_rule_needs_scores(self):
        if self.restore.stop_at is not None and (self.evaluate.safety is None or self.evaluate.task is None):
            raise ValueError("restore.stop_at needs evaluate.safety and evaluate.task: each checkpoint's harm and task score")
        return self

    @model_validator(mode="after")
    def _gate_needs_a_metric(self):
        if self.method == "restore" and self.rollback.mode == "auto" and self.evaluate.task is None:
            raise ValueError(
                "rollback.mode 'auto' needs a task score: add evaluate.task, "
                "or set rollback.mode to 'never' or 'always'"
            )
        return self
