"""Task metrics computed through the streamed model, without generation: `loss` and `kl`."""

from __future__ import annotations

import torch

from surgeon.data.batches import Batch
from surgeon.engine.layered import BASE, TUNED, LayeredModel, Plan, PreparedInputs
from surgeon.engine.objectives import answer_nll


def _mean_over_processes(engine: LayeredModel, total: float, count: float) -> float:
    """total / count over every process's share of the batches (a data-parallel run)."""
    summed = engine.collective.sum_(torch.tensor([total, count], dtype=torch.float64))
    return summed[0].item() / max(summed[1].item(), 1)


class _Streamed:
    """Inputs are embedded once per embedding source (base's for the base model, tuned's otherwise)."""

    def __init__(self, engine: LayeredModel, batches: list[Batch]):
        self.engine, self.batches = engine, batches
        self._prepared: dict[str, PreparedInputs] = {}

    def _inputs(self, plan: Plan) -> PreparedInputs:
        source = BASE if plan == BASE else TUNED
        if source not in self._prepared:
            self._prepared[source] = self.engine.prepare(self.batches, source, self.engine.layout.num_layers)
        return self._prepared[source]

    def _outputs(self, plan: Plan, select, description: str):
        """Yield (batch index, logits at the positions `select(batch index, hidden)` picks)."""
        with self.engine.output_head(plan) as logits, torch.no_grad():
            for b, hidden in self.engine.final_hidden(self._inputs(plan), plan, description=description):
                yield b, logits(select(b, hidden)).float()


class TaskLoss(_Streamed):
    """Teacher-forced NLL of the answers, the weighted mean over every answer token of the set (each
    token the same, or each distinct answer: `answer_batches`' balance); lower is better."""

    name = "loss"
    higher_is_better = False

    def __call__(self, plan: Plan) -> float:
        total, count = 0.0, 0.0
        targets = {}

        batches = self._inputs(plan).batches  # this process's share in a data-parallel run

        def answer_positions(b, hidden):
            predicting, targets[b] = batches[b].answer_predictions(hidden)
            return predicting

        for b, predicted in self._outputs(plan, answer_positions, f"task {self.name}"):
            weights = batches[b].answer_weights()
            total += answer_nll(predicted, targets[b], weights).item()
            count += weights.sum().item()
        return _mean_over_processes(self.engine, total, count)


class TaskDivergence(_Streamed):
    """Mean KL(tuned || model) of the next-token distribution after each task prompt; lower is better.

    tuned scores 0, so its floor is absolute: S0 + max_task_drop nats.
    """

    name = "kl"
    higher_is_better = False

    def _last(self, plan: Plan) -> list[torch.Tensor]:
        return [torch.log_softmax(out, -1).cpu() for _, out in self._outputs(plan, lambda b, h: h[:, -1], f"task {self.name}")]

    def __call__(self, plan: Plan) -> float:
        if not hasattr(self, "_reference"):
            self._reference = self._last(TUNED)
        total, count = 0.0, 0
        for reference, candidate in zip(self._reference, self._last(plan)):
            total += torch.nn.functional.kl_div(candidate, reference, log_target=True, reduction="sum").item()
            count += reference.shape[0]
        return _mean_over_processes(self.engine, total, count)
