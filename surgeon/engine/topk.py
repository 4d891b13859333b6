"""Global top-k over many tensors without concatenating them: memory O(k + one tensor).

Order is total and deterministic: larger value first, and among equal values the entry
offered earlier wins, exactly as a stable descending sort of the concatenation (in the
order the candidates were offered) would rank them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Selection:
    values: torch.Tensor
    tensor_ids: torch.Tensor
    indices: torch.Tensor

    def by_tensor(self) -> dict[int, torch.Tensor]:
        """Selected flat indices grouped by tensor id, sorted: one sort by (tensor, index), then split."""
        if self.indices.numel() == 0:
            return {}
        key = self.tensor_ids * (int(self.indices.max()) + 1) + self.indices
        order = torch.sort(key).indices
        ids, counts = torch.unique_consecutive(self.tensor_ids[order], return_counts=True)
        return dict(zip(ids.tolist(), torch.split(self.indices[order], counts.tolist())))


def _empty() -> Selection:
    return Selection(torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))


def top(selection: Selection, k: int) -> Selection:
    order = torch.sort(selection.values, descending=True, stable=True).indices[:k]
    return Selection(selection.values[order], selection.tensor_ids[order], selection.indices[order])


class StreamingTopK:
    """Offer candidates tensor by tensor (in a fixed order); `result()` is the global top k.

    Candidates pile up until there are 2k, then one selection of the k-th value (`torch.kthvalue`) cuts them
    back to k and raises a threshold: later candidates at or below it are dropped on arrival,
    since k earlier ones already rank above them. One stable sort of at most 2k values at the end.
    """

    def __init__(self, k: int):
        self.k = k
        self._parts: list[Selection] = []
        self._size = 0
        self._threshold: float | None = None

    @property
    def threshold(self) -> float | None:
        """Scores at or below this are dropped on arrival (None until the first cut)."""
        return self._threshold

    def offer(self, tensor_id: int, values: torch.Tensor, indices: torch.Tensor) -> None:
        """values[i] is the score of flat entry indices[i] of tensor `tensor_id`; indices ascending."""
        values = values.detach().float().cpu()
        indices = indices.cpu()
        if self.k <= 0 or values.numel() == 0:
            return
        if self._threshold is not None:
            keep = values > self._threshold
            values, indices = values[keep], indices[keep]
            if values.numel() == 0:
                return
        self._parts.append(Selection(values, torch.full_like(indices, tensor_id), indices))
        self._size += values.numel()
        if self._size > 2 * self.k:
            self._cut()

    def _cut(self) -> None:
        """Keep the k best: everything above the k-th value, and its ties in offer order."""
        pool = collect(self._parts)
        # the k-th largest value by selection (no ordering of the rest: faster than topk's k outputs)
        cut = torch.kthvalue(pool.values, pool.values.numel() - self.k + 1).values
        keep = pool.values > cut
        ties = (pool.values == cut).nonzero().squeeze(1)[: self.k - int(keep.sum())]
        keep[ties] = True
        keep = keep.nonzero().squeeze(1)  # resolved once, not once per array
        self._parts = [Selection(pool.values[keep], pool.tensor_ids[keep], pool.indices[keep])]
        self._size = self.k
        self._threshold = float(cut)

    def result(self) -> Selection:
        return top(collect(self._parts), self.k)


def collect(parts: list[Selection]) -> Selection:
    """Concatenate selections in the order given (for sets already bounded by k), in one copy."""
    if not parts:
        return _empty()
    return Selection(torch.cat([p.values for p in parts]), torch.cat([p.tensor_ids for p in parts]), torch.cat([p.indices for p in parts]))
