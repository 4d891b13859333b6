"""The recipe section `restore:` (pydantic only: the recipe layer reads it without torch): how much
a step restores, when the schedule ends, and what the rollback may take back."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from surgeon.methods.settings import Section
from surgeon.recipe.sizes import MAX_COUNT


class StopAt(Section):
    """Ends the schedule at the first checkpoint that reaches the target within the task floor."""

    harmful_rate: float = Field(ge=0.0, le=1.0)
    """Stop at the first checkpoint whose harmful rate is at most this, within the task floor."""
    patience: int | None = Field(default=None, ge=1, le=MAX_COUNT)
    """Also stop after this many checkpoints in a row within the floor that did not lower the
    least harmful rate so far: where the target is out of reach, more steps stop buying harm."""


class Rollback(Section):
    mode: Literal["auto", "always", "never"] = "auto"
    """auto: rollback only if the warm-up falls past the task floor; always; never."""
    ratio: float = Field(default=0.2, gt=0.0, le=1.0)
    """Share of each step's restored weights that the task gradient may send back to tuned."""
    max_task_drop: float = Field(default=0.05, ge=0.0, lt=1.0)
    """The task floor: the largest relative drop of the task score from tuned's."""
    objective: Literal["direction", "answer_loss"] = "direction"
    """What the task gradient is of: direction, -cos(h, v_task) at the probe layer (the paper's); answer_loss, the teacher-forced loss of data.task's answers through every layer and the head (needs data.task.answer_field)."""


class Restore(Section):
    sparsity: float = Field(default=0.002, gt=0.0, le=1.0)
    """Share of the decoder parameters restored per step (k = sparsity x N)."""
    steps: int = Field(default=20, ge=1, le=MAX_COUNT)
    """The most steps; stop_at and the task floor end the schedule earlier."""
    stop_at: StopAt | None = None
    """A target that ends the schedule early; needs evaluate.safety and evaluate.task."""
    warmup: int = Field(default=5, ge=0, le=MAX_COUNT)
    """Restore-only steps before the gate decides between restore-only and a restart with rollback."""
    save_every: int = Field(default=5, ge=1, le=MAX_COUNT)
    """A checkpoint (scored, resumable) every this many steps."""
    rollback: Rollback = Rollback()
    """What the task may take back: when a step's restored weights are partly sent back to tuned, and the task floor."""

    @model_validator(mode="after")
    def _warmup_within_steps(self):
        if self.warmup > self.steps:
            raise ValueError(f"warmup ({self.warmup}) is larger than steps ({self.steps})")
        return self
