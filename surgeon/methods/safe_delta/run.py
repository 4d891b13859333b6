"""Safe Delta, streamed: one forward of base over data.harmful, layer by layer; when a layer has
seen every batch, each of its linear weights is adjusted from its inputs' Gram matrix and kept in a
spill store until the writer asks for it. Everything else is tuned's, bit-exact.

The adjustment follows the authors' code (ColinLu50/SafeDelta, `SafeDeltaRunner.adjust_delta`),
itself built on SparseGPT: blocks of 2,048 columns, sub-blocks of 4, 1% damping, the 15% most
sensitive entries never taken, the budget mean(1/d^2) x s/2 x rows/4096. Adapted here: H is the
Gram matrix of the inputs over the harmful prompts' real tokens (chat-templated prompts alone; the
authors use harmful instructions with the aligned model's refusals, batch 1, and average over
them). Entries of equal sensitivity (a column's) are taken in row order.
"""

from __future__ import annotations

import torch

from surgeon.engine.layered import BASE
from surgeon.engine.store import SpillStore
from surgeon.methods.interface import Repair
from surgeon.methods.safe_delta.settings import SafeDelta

BLOCK = 2048
SUB_BLOCK = 4
DAMP = 0.01
SENSITIVE_SHARE = 0.15  # the share of a block's entries, most sensitive first, that are never taken
REFERENCE_ROWS = 4096  # the authors' constants were set for Llama-2-7B's 4,096 rows


def gram(inputs: torch.Tensor) -> torch.Tensor:
    """The (features, features) Gram matrix of a layer's (tokens, features) inputs."""
    return inputs.T @ inputs


def _upper_inverse_factor(h: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor of H^-1 after damping (features no token lit get a unit diagonal)."""
    h = h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    h += DAMP * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()


def safe_delta(base: torch.Tensor, tuned: torch.Tensor, h: torch.Tensor, scale: float) -> tuple[torch.Tensor, int]:
    """The adjusted weight (fp32) and how many of tuned's deltas it took."""
    weight, target = base.float().clone(), tuned.float()
    rows, columns = weight.shape
    hinv = _upper_inverse_factor(h)
    budget_scale = scale / 2 * rows / REFERENCE_ROWS
    taken = 0
    for i1 in range(0, columns, BLOCK):
        i2 = min(i1 + BLOCK, columns)
        block, block_target = weight[:, i1:i2].clone(), target[:, i1:i2]
        chosen, errors = torch.zeros_like(block), torch.zeros_like(block)
        inverse = hinv[i1:i2, i1:i2]
        d = torch.diag(inverse)
        sensitivity = (1 / d**2).expand(rows, -1)
        cost = ((block_target - block) ** 2 / d**2).flatten()
        order = torch.argsort(sensitivity.flatten(), stable=True)
        order = order[: order.numel() - int(SENSITIVE_SHARE * order.numel())]
        within = torch.cumsum(cost[order], 0) <= sensitivity.mean() * budget_scale
        mask = torch.zeros(cost.numel(), dtype=torch.bool, device=cost.device)
        mask[order[within]] = True
        mask = mask.view(rows, -1)
        taken += int(mask.sum())
        for j1 in range(0, i2 - i1, SUB_BLOCK):
            j2 = min(j1 + SUB_BLOCK, i2 - i1)
            current = block[:, j1:j2]
            value = torch.where(mask[:, j1:j2], block_target[:, j1:j2], current)
            chosen[:, j1:j2] = value
            error = (current - value) / d[j1:j2]
            block[:, j2:] -= error @ inverse[j1:j2, j2:]  # the later columns of the block compensate
            errors[:, j1:j2] = error
        weight[:, i1:i2] = chosen
        weight[:, i2:] -= errors @ hinv[i1:i2, i2:]  # and the later blocks
    return weight, taken


class SafeDeltaRun:
    def __init__(self, context):
        self.context = context
        self.scale = (context.recipe.safe_delta or SafeDelta()).scale
        pair = context.pair
        self.base, self.tuned = pair.base.tensors, pair.tuned.tensors
        self.prepared = pair.engine.prepare(context.prompt_batches(context.inputs.harmful), BASE, pair.layout.num_layers)
        # the adjusted weights wait here for the writer (not a context store: those are cleared before the write)
        self.adjusted = SpillStore(context.settings.stores_bytes, context.workspace / "safe-delta")
        self.taken = 0

    def _layer(self, _: int, grams: dict[str, torch.Tensor]) -> None:
        for name, h in grams.items():
            tuned = self.tuned.get(name)
            weight, taken = safe_delta(self.base.get(name).to(h.device), tuned.to(h.device), h, self.scale)
            self.adjusted.put(name, weight.to(tuned.dtype).cpu())
            self.taken += taken

    def get(self, name: str) -> torch.Tensor:
        return self.adjusted.get(name) if name in self.adjusted else self.tuned.get(name)

    def run(self) -> Repair:
        engine = self.context.pair.engine
        engine.linear_inputs(self.prepared, BASE, gram, self._layer, "safe_delta: input Gram matrices on harmful prompts (base)")
        engine.release(self.prepared)
        names = [weight for layer in self.context.pair.layout.linear_weights for _, weight, _ in layer]
        changed = self.context.share_of_decoder(names)
        prompts = len(self.context.inputs.harmful)
        return Repair(
            change=(f"{changed['tensors']} linear weights rebuilt from base: {self.taken:,} of tuned's deltas kept within the safety "
                    f"budget (scale {self.scale}), the rest compensated, on the input statistics of {prompts} harmful prompts"),
            settings={"scale": self.scale, "harmful_prompts": prompts},
            changed=changed, tensors=self.get,
        )
