"""Recipe sections of the post-hoc repairs surgeon compares restore with (pydantic only: the recipe
layer reads them without torch). Each becomes the recipe section named after its method."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    # the recipe's own rule: unknown keys are errors, docstrings describe the fields
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class Linear(Section):
    alpha: float = Field(default=0.5, gt=0.0, le=1.0)
    """tuned + alpha x (base - tuned): the share of the fine-tuning update taken back (1 gives base)."""


class Antidote(Section):
    ratio: float = Field(default=0.1, gt=0.0, lt=1.0)
    """Share of each row of every decoder linear weight pruned back to base: the entries of the update with the highest |tuned - base| x input norm over data.harmful (Antidote's dense_ratio)."""


class SafeLora(Section):
    select: Literal["number", "threshold"] = "number"
    """Which update matrices are projected: the `number` with the lowest cosine to their projection, or every one at or below `threshold`."""
    number: int = Field(default=10, ge=1)
    """Matrices projected with select: number."""
    threshold: float = Field(default=0.5, ge=-1.0, le=1.0)
    """Cosine at or below which a matrix is projected with select: threshold."""


class DgHard(Section):
    scale: float = Field(default=1.0, gt=0.0)
    """Multiplier of the Donoho-Gavish threshold: singular values of each update matrix above scale x omega(beta) x sigma are kept."""
