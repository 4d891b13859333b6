"""Command-line options as models: the CLI generates its flags (name, type, help) from these
fields, and validates what it was given through them, as mergekit does with its MergeOptions."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from surgeon.recipe.schema import Device, Strict


class RunOptions(Strict):
    """`surgeon run`: each flag changes this run only; the recipe stays as written."""

    output: str | None = Field(default=None, json_schema_extra={"short": "-o"})
    """Output folder, from the current folder (overrides output.path)."""
    overwrite: bool = False
    """Replace an earlier surgeon output at the destination."""
    device: Device | None = None
    """auto, cpu, cuda, cuda:N or mps (overrides compute.device)."""
    force_push: bool = False
    """Push (output.push) even if the evaluation does not show a repair."""
    fresh: bool = False
    """Start over instead of resuming the saved state of an interrupted run."""


class EvalOptions(Strict):
    """`surgeon eval`: the evaluate section, a recipe's or none, with these laid over it."""

    recipe: str | None = None
    """Take the evaluate section (and base/tuned) from this recipe."""
    safety: str | None = None
    """Harmful prompts (.jsonl/.json/.csv/.parquet, field 'prompt'); default: the recipe's evaluate.safety, else the HarmBench test set that ships with surgeon; none: harm not measured."""
    category_field: str | None = None
    """The column of --safety that names each prompt's harm category (harmful rate per category; default: the recipe's, 'category' for the shipped set)."""
    prompt_field: str | None = None
    """The column of --safety, --task and --benign that holds the prompt: text or messages (default: prompt)."""
    answer_field: str | None = None
    """The column of --task that holds the reference answer (default: response, else the messages' last assistant turn)."""
    task: str | None = None
    """Task rows with a prompt and a reference answer."""
    benign: str | None = None
    """Harmless prompts: each model's over-refusal rate (default: the recipe's evaluate.benign, else none; surgeon://benign.jsonl is the shipped set)."""
    metric: str | None = None
    """exact_match, contains, f1:<label>, rouge_l, loss, kl or python:module:function (default: the recipe's, else exact_match)."""
    allow_code: bool = False
    """Let a python:module:function --metric run (its module is imported and executed)."""
    judge: Literal["refusal", "harmbench_prefixes", "guard", "classifier"] | None = None
    """How answers to harmful prompts are judged (default: the recipe's, else refusal)."""
    judge_model: str | None = None
    """The guard or classifier model for --judge guard/classifier."""
    limit: int | None = Field(default=None, ge=1)
    """First N rows of each set (default: every row)."""
    batch_size: int | None = Field(default=None, ge=1)
    """Prompts per generation batch (default: the recipe's evaluate.batch_size, else 16)."""
    max_new_tokens: int | None = Field(default=None, ge=1)
    """Longest answer generated (default: the set's: 64 for the shipped harm set, else 128)."""
    device: Device | None = None
    """auto, cpu, cuda, cuda:N or mps (overrides compute.device)."""
    show: int | None = Field(default=None, ge=1)
    """Print the first N prompts of each set with every model's answer and its verdict."""
    answers: str | None = None
    """Write every answer to this JSONL file, one line per model and prompt (set, row, prompt, answer, verdict or reference), so anyone can judge them again."""
