"""What a gradient pass differentiates: a loss per batch from the hidden states leaving its last layer."""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

import torch


if TYPE_CHECKING:
    from surgeon.data.batches import Batch
    from surgeon.engine.masks import MaskSet
    from surgeon.processes import Collective

BatchLoss = Callable[[int, torch.Tensor], torch.Tensor]  # (batch index, hidden states) -> loss


class Engine(Protocol):
    """What an objective asks of the engine that runs the pass (engine/layered.LayeredModel)."""

    device: torch.device
    collective: Collective

    def output_head(self, plan: str | MaskSet) -> AbstractContextManager[Callable[[torch.Tensor], torch.Tensor]]: ...


class Prepared(Protocol):
    """The prompt set of the pass (engine/layered.PreparedInputs): its batches, this process's share."""

    batches: list[Batch]


class Objective(Protocol):
    def losses(self, engine: Engine, prepared: Prepared, plan: str | MaskSet) -> AbstractContextManager[BatchLoss]:
        """Opened once per pass, around the batches' losses (what they need is held only meanwhile)."""
        ...


@dataclass(frozen=True)
class TowardDirection:
    """-cos(mean over a batch of the last token's hidden state, direction): restore's objective, and
    the paper's rollback (method.md)."""

    direction: torch.Tensor

    @contextmanager
    def losses(self, engine: Engine, prepared: Prepared, plan: str | MaskSet):
        target = self.direction.to(engine.device, torch.float32)
        yield lambda b, hidden: -torch.nn.functional.cosine_similarity(hidden[:, -1, :].float().mean(0), target, dim=0)


def answer_nll(predicted: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The weighted sum of the answer tokens' next-token NLL (`Batch.answer_weights`)."""
    return (torch.nn.functional.cross_entropy(predicted.float(), targets, reduction="none") * weights.to(predicted.device)).sum()


class AnswerLoss:
    """The teacher-forced loss of the answers: the weighted mean over every answer token of the set
    (its processes' shares together; `Batch.answer_weights`) of the next-token NLL, through the final
    norm and the output head. The pass must run through every decoder layer."""

    @contextmanager
    def losses(self, engine: Engine, prepared: Prepared, plan: str | MaskSet):
        total = engine.collective.sum_(torch.tensor(sum(b.answer_weights().sum().item() for b in prepared.batches), dtype=torch.float64)).item()
        with engine.output_head(plan) as logits:
            def loss(b: int, hidden: torch.Tensor) -> torch.Tensor:
                batch = prepared.batches[b]
                predicting, targets = batch.answer_predictions(hidden)
                return answer_nll(logits(predicting), targets, batch.answer_weights()) / (total or 1)

            yield loss
