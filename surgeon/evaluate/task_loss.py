"""Task metric `loss`: mean teacher-forced NLL of the answer tokens given the templated prompt."""

from __future__ import annotations

import torch

from surgeon.data.batches import IGNORE, Batch
from surgeon.engine.layered import TUNED, LayeredModel, Plan


class TaskLoss:
    """Token-weighted mean over every answer token of the set; lower is better."""

    name = "loss"
    higher_is_better = False

    def __init__(self, engine: LayeredModel, batches: list[Batch]):
        self.engine = engine
        self.batches = batches
        self.prepared = engine.prepare(batches, TUNED, engine.layout.num_layers)

    def __call__(self, plan: Plan) -> float:
        total, count = 0.0, 0
        with self.engine.output_head() as logits, torch.no_grad():
            for b, hidden in self.engine.final_hidden(self.prepared, plan, description=f"task {self.name}"):
                targets = self.batches[b].labels[:, 1:].to(hidden.device)
                scored = targets != IGNORE
                predicted = logits(hidden[:, :-1][scored]).float()
                total += torch.nn.functional.cross_entropy(predicted, targets[scored], reduction="sum").item()
                count += int(scored.sum())
        return total / max(count, 1)
