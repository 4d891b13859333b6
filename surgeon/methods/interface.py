"""What a repair method is to the rest of surgeon: built from a run context, it returns a Repair.

Nothing here imports torch, so the recipe layer can name methods without loading an engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

from surgeon.records import MethodRecord, Tradeoff

if TYPE_CHECKING:
    import torch

    from surgeon.engine.masks import MaskSet


@dataclass
class Repair:
    """A method's result. Exactly one of `masks` (weights of base chosen into tuned: the output is
    where(mask, base, tuned), and the masks are published) or `tensors` (every output tensor by
    name, streamed one at a time to the writer).

    `tradeoff`, for a method that scores checkpoints, is what the report, the card, the plot, the
    push gate and `surgeon pick` show and read; `record` is the method's own part of surgeon.json
    (its registered type, which renders its own sections)."""

    # what the method changed in tuned: one sentence, and {tensors, parameters, share_of_N (of the
    # decoder parameters)}; either, and the record, may be a function, called once the tensors are
    # written, for a method that learns what it changed while they stream
    change: str | Callable[[], str]
    settings: dict  # what it ran with, as recorded
    changed: dict | Callable[[], dict]
    masks: MaskSet | None = None
    tensors: Callable[[str], torch.Tensor] | None = None
    masks_metadata: dict[str, str] = field(default_factory=dict)
    tradeoff: Tradeoff | None = None
    record: MethodRecord | Callable[[], MethodRecord] | None = None
    # the masks files of the checkpoints a method scored, by step: the output keeps them, so that
    # `surgeon pick` can write another checkpoint of the trade-off without a gradient pass
    checkpoints: dict[int, Path] = field(default_factory=dict)

    def __post_init__(self):
        if (self.masks is None) == (self.tensors is None):
            raise ValueError("a Repair gives exactly one of masks or tensors")

    def summary(self) -> tuple[str, dict, MethodRecord | None]:
        """The change, `changed` and the record, once the tensors are written."""
        resolve = lambda value: value() if callable(value) else value
        return resolve(self.change), resolve(self.changed), resolve(self.record)


class Method(Protocol):
    """Built by its registered factory from the run context (surgeon.context.RunContext)."""

    def run(self) -> Repair: ...
