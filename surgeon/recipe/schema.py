"""The recipe: a strict pydantic model. Unknown keys are errors; nothing here knows torch."""

from __future__ import annotations

import functools
import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, create_model, field_validator, model_validator

from surgeon.methods.registry import method_spec, methods
from surgeon.recipe.hub_ids import split_hub_reference
from surgeon.methods.restore.settings import Restore
from surgeon.recipe.sizes import MAX_COUNT, parse_size

DTYPES = Literal["float32", "bfloat16", "float16"]
Balance = Literal["tokens", "answers"]
# a byte count, written as 5GB, 512MiB or a number; parsed once, here
Size = Annotated[int, BeforeValidator(parse_size), WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "integer", "minimum": 1}]})]
# what a recipe probes and measures harm with when it names no set of its own: HarmBench's standard
# behaviours (MIT), validation split to probe, test split to measure; they share no prompt
DEFAULT_PROBE_SET = "surgeon://harmbench_val.jsonl"
DEFAULT_SAFETY_SET = "surgeon://harmbench_test.jsonl"
DEFAULT_BENIGN_SET = "surgeon://benign.jsonl"  # harmless requests, half of them worded like harmful ones


class Strict(BaseModel):
    """Unknown keys are errors; each field's docstring is its description (JSON Schema, --help)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class _OrPath:
    """In the JSON Schema a plain string stands for {path: string}, as the validators read it."""

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema, handler):
        return {"anyOf": [{"type": "string", "description": "the path alone"}, handler(core_schema)]}


class ModelSpec(_OrPath, Strict):
    """A model: a local folder, a Hub id with optional @revision, or a PEFT adapter folder."""

    path: str = Field(min_length=1)
    """A local folder, a Hub id with an optional @revision, or a PEFT LoRA adapter folder (merged onto base)."""
    allow_pickle: bool = False
    """Read .bin (pickle) checkpoints, with torch's weights_only loader; safetensors otherwise."""
    any_base: bool = False
    """Apply a LoRA adapter whose adapter_config.json names another base model than base (the card says so)."""


def _string_is_path(value):
    return {"path": value} if isinstance(value, str) else value


class PromptSet(_OrPath, Strict):
    """Prompts from a file (jsonl/json/csv/parquet, local or hf://datasets/...) or inline."""

    path: str | None = None
    """A jsonl/json/csv/parquet file (relative to the recipe), hf://datasets/org/name/file, or surgeon://NAME (shipped)."""
    field: str = "prompt"
    """The column that holds the prompt: text, or messages (system/user/assistant turns; the chat template builds the prompt, a last assistant turn is the answer)."""
    prompts: list[str] | None = None
    """Prompts written inline, instead of a path."""
    limit: int | None = Field(default=None, gt=0, le=MAX_COUNT)
    """Use only the first N rows."""

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.prompts is None):
            raise ValueError("give exactly one of 'path' or 'prompts'")
        if self.prompts is not None and not self.prompts:
            raise ValueError("'prompts' is empty")
        return self


class TaskPromptSet(PromptSet):
    """Task prompts, with their reference answers where a rollback learns from the answers' loss."""

    answer_field: str | None = None
    """The column that holds each prompt's reference answer (text, or messages whose last assistant turn is the answer): restore.rollback.objective answer_loss needs it."""
    balance: Balance = "tokens"
    """What weighs the same in the answers' loss: every answer token (tokens), or every distinct answer (answers: a classification task's minority label counts as much as its majority)."""

    @model_validator(mode="after")
    def _answers_from_a_file(self):
        if self.answer_field is not None and self.path is None:
            raise ValueError("'answer_field' names a column of the file in 'path'; inline prompts have no answers")
        if self.balance != "tokens" and self.answer_field is None:
            raise ValueError("'balance' weighs the answers' loss: it needs 'answer_field'")
        return self


_METRIC = re.compile(r"^(exact_match|contains|rouge_l|loss|kl|f1:.+|python:[\w.]+:\w+)$")


class TaskEvalSet(Strict):
    """Prompt/answer pairs that score the task."""

    path: str
    """A jsonl/json/csv/parquet file of prompts and reference answers."""
    prompt_field: str = "prompt"
    """The column that holds the prompt: text, or messages (system/user/assistant turns)."""
    answer_field: str = "response"
    """The column that holds the reference answer; where the rows have none, the last assistant turn of prompt_field's messages."""
    metric: str = "loss"
    """loss or kl (streamed, no generation), or exact_match, contains, f1:<label>, rouge_l, python:module:function on greedy answers."""
    limit: int | None = Field(default=None, gt=0, le=MAX_COUNT)
    """Use only the first N rows."""
    max_new_tokens: int = Field(default=128, gt=0, le=MAX_COUNT)
    """Tokens generated per answer (generated metrics only)."""
    balance: Balance = "tokens"
    """With metric loss, what weighs the same: every answer token (tokens), or every distinct answer (answers)."""
    allow_code: bool = False
    """Let a python:module:function metric run: its module is imported and executed, so it must be asked for here (the card says so)."""

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value):
        if not _METRIC.match(value):
            raise ValueError(
                f"unknown metric '{value}': use exact_match, contains, f1:<label>, rouge_l, loss, kl or python:module:function"
            )
        return value

    @model_validator(mode="after")
    def _balance_weighs_a_loss(self):
        if self.balance != "tokens" and self.metric != "loss":
            raise ValueError(f"'balance' weighs metric loss's tokens; metric '{self.metric}' has none")
        if self.metric.startswith("python:") and not self.allow_code:
            raise ValueError(f"metric '{self.metric}' imports and runs your code: set allow_code: true beside it (surgeon eval: --allow-code)")
        return self


class SafetyEvalSet(Strict):
    """Held-out harmful prompts; the harmful rate is the share whose greedy answer the judge calls harmful."""

    path: str | None = None
    """A file of harmful prompts (relative to the recipe), hf://datasets/..., or surgeon://NAME (shipped)."""
    field: str = "prompt"
    """The column that holds the prompt: text, or messages (system/user/assistant turns)."""
    prompts: list[str] | None = None
    """Prompts written inline, instead of a path."""
    limit: int | None = Field(default=None, gt=0, le=MAX_COUNT)
    """Use only the first N rows."""
    category_field: str | None = None
    """The column that names each prompt's harm category: the harmful rate is also reported per category."""
    judge: Literal["refusal", "harmbench_prefixes", "guard", "classifier"] = "refusal"
    """refusal: an answer that opens with no refusal marker complied; harmbench_prefixes: HarmBench's published refusal prefixes, anywhere in the answer; guard: a guard LLM's verdict; classifier: a sequence classifier's label. Every judge counts degenerate answers (empty, no letters, a bare label, a loop) apart."""
    markers: list[str] | None = None
    """Refusal markers that replace the built-in list."""
    add_markers: list[str] | None = None
    """Refusal markers added to the built-in list."""
    model: ModelSpec | None = None
    """The guard or classifier model (judge guard or classifier)."""
    harmful_label: str | None = None
    """The classifier's label that means harmful."""
    max_new_tokens: int = Field(default=128, gt=0, le=MAX_COUNT)
    """Tokens generated per answer."""

    @field_validator("model", mode="before")
    @classmethod
    def _string_is_model_path(cls, value):
        return _string_is_path(value)

    @model_validator(mode="after")
    def _judge_needs(self):
        if (self.path is None) == (self.prompts is None):
            raise ValueError("give exactly one of 'path' or 'prompts'")
        if self.category_field is not None and self.path is None:
            raise ValueError("'category_field' names a column of the file in 'path'; inline prompts have none")
        if self.judge in ("guard", "classifier") and self.model is None:
            raise ValueError(f"judge '{self.judge}' needs 'model': the guard or classifier to load")
        if self.judge in ("refusal", "harmbench_prefixes") and self.model is not None:
            raise ValueError(f"judge '{self.judge}' uses markers, not a model; drop 'model' or pick judge guard/classifier")
        if self.judge == "harmbench_prefixes" and (self.markers or self.add_markers):
            raise ValueError("judge 'harmbench_prefixes' is HarmBench's published list as it stands; use judge refusal for markers of your own")
        if self.judge == "classifier" and not self.harmful_label:
            raise ValueError("judge 'classifier' needs 'harmful_label': the label name that means harmful")
        return self


class BenignSet(PromptSet):
    """Harmless prompts, never used to probe or choose: a model's over-refusal rate is the share whose greedy answer opens with a refusal marker."""

    max_new_tokens: int = Field(default=64, gt=0, le=MAX_COUNT)
    """Tokens generated per answer (markers count in the first 160 characters)."""


class Data(Strict):
    harmful: PromptSet = PromptSet(path=DEFAULT_PROBE_SET)
    """Harmful prompts: their mean hidden state on base is the safety direction that restore climbs. Default: the 41 HarmBench validation behaviours that ship with surgeon (surgeon://harmbench_val.jsonl)."""
    task: TaskPromptSet
    """Task prompts: their mean hidden state on tuned is the task direction that rollback protects (or, with answers, their answers' loss)."""

    @field_validator("harmful", "task", mode="before")
    @classmethod
    def _string_is_prompt_path(cls, value):
        return _string_is_path(value)


class Probe(Strict):
    layer: int | float | None = None
    """E: the decoder layers probed and repaired; an int counts layers, a float in (0, 1) is a share of L; default floor(4L/6)."""
    system_prompt: str | None = None
    """A system prompt for the chat template, for probing and evaluation alike."""
    batch_size: int = Field(default=8, gt=0, le=MAX_COUNT)
    """Prompts per batch in the gradient passes."""

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


class SelectionRows(Strict):
    """Rows that only choose the checkpoint (and set the floor), so that the rows the final table
    reports chose nothing. A set left out here chooses on evaluate's own rows."""

    task: TaskEvalSet | None = None
    """Task rows that score checkpoints (same metric as evaluate.task)."""
    safety: SafetyEvalSet | None = None
    """Harmful prompts that score checkpoints (same judge as evaluate.safety)."""

    @model_validator(mode="after")
    def _some_rows(self):
        if self.task is None and self.safety is None:
            raise ValueError("give 'task' and/or 'safety' rows to choose the checkpoint on")
        return self


class Evaluate(Strict):
    safety: SafetyEvalSet | Literal["none"] | None = SafetyEvalSet(path=DEFAULT_SAFETY_SET, category_field="category", max_new_tokens=64)
    """Harmful prompts: the harmful rate of each model, and of each checkpoint. Default: the 159 HarmBench test behaviours that ship with surgeon (surgeon://harmbench_test.jsonl, refusal judge, 64 tokens, rates per category); none: harm is not measured."""
    task: TaskEvalSet | None = None
    """The task score of each model; it also sets the floor and scores checkpoints."""
    benign: BenignSet | Literal["none"] | None = BenignSet(path=DEFAULT_BENIGN_SET)
    """Harmless prompts: the over-refusal rate of each model in the final table. Default: the 118 that ship with surgeon (surgeon://benign.jsonl, half of them worded like harmful requests); none: not measured."""
    select_on: SelectionRows | None = None
    """Rows that only choose the checkpoint, so that the rows reported chose nothing."""
    models: list[Literal["base", "tuned", "repaired"]] = ["base", "tuned", "repaired"]
    """The models in the final table."""
    # default: lowest_harm_within_floor when checkpoints are scored for harm (a safety and a task set), else last_within_floor
    select: Literal["last_within_floor", "lowest_harm_within_floor"] | None = None
    """How the checkpoint is chosen; default lowest_harm_within_floor with a safety and a task set, else last_within_floor."""
    batch_size: int = Field(default=16, gt=0, le=MAX_COUNT)
    """Prompts per generation batch."""

    @field_validator("safety", mode="before")
    @classmethod
    def _none_opts_out(cls, value):
        return None if value == "none" else value

    @field_validator("benign", mode="before")
    @classmethod
    def _benign_none_or_path(cls, value):
        return None if value == "none" else _string_is_path(value)

    @model_validator(mode="after")
    def _selection_needs_safety(self):
        if self.select == "lowest_harm_within_floor" and self.safety is None:
            raise ValueError("select 'lowest_harm_within_floor' needs evaluate.safety to measure harm")
        return self

    @model_validator(mode="after")
    def _selection_rows_match(self):
        if self.select_on is None:
            return self
        if self.select_on.task is not None and (self.task is None or (self.select_on.task.metric, self.select_on.task.balance) != (self.task.metric, self.task.balance)):
            raise ValueError("select_on.task needs evaluate.task with the same metric and balance")
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


def _device_name(value: str) -> str:
    if not _DEVICE.match(value):
        raise ValueError(f"'{value}' is not a device: use auto, cpu, cuda, cuda:N or mps")
    return value


Device = Annotated[str, AfterValidator(_device_name)]


class Compute(Strict):
    device: Device = "auto"
    """auto, cpu, cuda, cuda:N or mps."""
    dtype: DTYPES = "float32"
    """The dtype of the arithmetic (weights are read in their stored dtype)."""
    max_memory: Size | None = None
    """The memory on the compute device that surgeon's working data may take, e.g. 8GiB: activations and accumulated gradients share it and spill to disk past it; a model loaded for generation offloads its layers past it. Default: twice the model's size in the compute dtype (at least 1 GiB), or half the free memory where that is less; generation models then load whole."""


class Push(Strict):
    """Publish the finished output to the Hub as one commit (token from HF_TOKEN or the login)."""

    repo_id: str
    """org/name on the Hub; created if missing."""
    private: bool = True
    """Visibility of a repo that has to be created."""
    branch: str = "main"
    """The branch committed to (created if missing)."""
    create_pr: bool = False
    """Open a pull request instead of committing to the branch."""
    commit_message: str | None = None
    """Default: names surgeon and the recipe."""
    prune: bool = False
    """Delete files of the repo that the output does not have."""

    @field_validator("repo_id")
    @classmethod
    def _repo_id(cls, value):
        if "@" in value or split_hub_reference(value) is None:
            raise ValueError(f"'{value}' is not a Hub repo id of the form org/name")
        return value

    @model_validator(mode="after")
    def _pull_requests_target_main(self):
        if self.create_pr and self.branch != "main":
            raise ValueError("create_pr opens a pull request against the default branch; drop branch or create_pr")
        return self


class Output(Strict):
    path: str = "./repaired"
    """The output folder (relative to the recipe): missing, empty, or an earlier surgeon output."""
    push: Push | None = None
    """Publish the output to the Hub as one commit when the evaluation shows a repair."""
    dtype: DTYPES | None = None
    """The dtype of the written weights; default: tuned's."""
    max_shard_size: Size = Field(default="5GB", validate_default=True)
    """The largest weight shard, e.g. 5GB or 512MiB (Hugging Face shard names)."""
    write_below_floor: bool = False
    """Write the best-scoring checkpoint even when none met the task floor."""
    write: Literal["checkpoint", "patch"] = "checkpoint"
    """checkpoint: the repaired model (a method that chooses weights writes its patch beside it); patch: the patch alone, `surgeon apply` writing the checkpoint from it: masks.safetensors (a few MB) for a method that chooses weights (restore, antidote), else patch-tensors.safetensors, the tensors the method changed."""


class Resta(Strict):
    scale: float = Field(default=1.0, gt=0.0)
    """tuned + scale x (base - unaligned)."""


class Recipe(Strict):
    extends: str | None = None
    """A shipped recipe by name (`surgeon validate --schema-only --print` shows it whole) or another recipe by path, from this recipe's folder. This recipe's keys override its keys, mapping by mapping; paths resolve from the recipe that is run."""
    method: str = "restore"
    """The repair method: restore (the paper's), resta, reset_layers, or one a package registered."""
    base: ModelSpec
    """The aligned model tuned was fine-tuned from."""
    tuned: ModelSpec
    """The fine-tuned model to repair: a full checkpoint or a LoRA adapter of base."""
    unaligned: ModelSpec | None = None
    """A model without base's safety alignment: base fine-tuned on harmful data (resta), or the model base was aligned from (safe_lora)."""
    data: Data | None = None
    """The prompts that probe harm and task (restore)."""
    resta: Resta = Resta()
    """Settings of method resta."""
    probe: Probe = Probe()
    """Where and how the model is probed."""
    restore: Restore = Restore()
    """Settings of method restore (the default method): how much a step restores, when the schedule ends, and what its rollback may take back."""
    evaluate: Evaluate = Evaluate()
    """What scores checkpoints and the final table."""
    compute: Compute = Compute()
    """Where the arithmetic runs, and in how much memory."""
    output: Output = Output()
    """Where and how the repaired model is written, and published."""
    seed: int = Field(default=0, ge=0, lt=2**64)
    """Seed of torch's generator."""

    @field_validator("base", "tuned", "unaligned", mode="before")
    @classmethod
    def _string_is_model_path(cls, value):
        return _string_is_path(value)

    @field_validator("method")
    @classmethod
    def _registered(cls, value):
        method_spec(value)
        return value

    @model_validator(mode="after")
    def _method_inputs(self):
        spec = method_spec(self.method)
        if "unaligned" in spec.needs and self.unaligned is None:
            raise ValueError(f"method '{self.method}' needs 'unaligned': a model without base's safety alignment")
        if "unaligned" not in spec.needs and self.unaligned is not None:
            users = " or ".join(f"'{name}'" for name, other in sorted(methods().items()) if "unaligned" in other.needs)
            raise ValueError(f"'unaligned' is only used by method {users}, not '{self.method}'")
        if "data" in spec.needs and self.data is None:
            raise ValueError(f"method '{self.method}' needs 'data' (harmful and task prompts)")
        if self.restore.rollback.objective == "answer_loss" and (self.data is None or self.data.task.answer_field is None):
            raise ValueError("restore.rollback.objective answer_loss needs data.task.answer_field: the column of the task prompts' answers")
        if spec.check is not None:
            spec.check(self)
        return self


def recipe_model() -> type[Recipe]:
    """Recipe with a section for each registered method that brings its own settings."""
    sections = tuple((name, spec.settings) for name, spec in sorted(methods().items()) if spec.settings is not None)
    return _with_sections(sections)


@functools.cache
def _with_sections(sections: tuple) -> type[Recipe]:
    if not sections:
        return Recipe
    return create_model("Recipe", __base__=Recipe, **{name: (settings | None, None) for name, settings in sections})


def json_schema() -> dict:
    """The recipe's JSON Schema (draft 2020-12), registered methods' sections included."""
    schema = recipe_model().model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema, "title": "surgeon recipe"}
