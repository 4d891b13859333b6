"""The recipe section `safe_delta:` (pydantic only: the recipe layer reads it without torch)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class SafeDelta(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    scale: float = Field(default=0.1, gt=0.0)
    """The safety budget s: per block of columns, the deltas are taken in order of their column's sensitivity while their summed cost stays within mean(1 / [H^-1]_jj^2) x s/2 x rows/4096 (the authors' constants); larger keeps more of the fine-tune. The authors use 0.1-0.11 on Llama-2-7B."""
