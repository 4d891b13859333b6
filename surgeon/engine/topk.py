"""Global top-k over many tensors without concatenating them: memory O(k + one tensor).

Order is total and deterministic: larger value first, and among equal values the entry of the
lower tensor id, then the lower flat index, wins, whatever order the candidates were offered in:
a stable descending sort of the candidates laid out by (tensor id, index) ranks them the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# candidates pile up to this many times k before those below the threshold are let go: each let-go
# costs a pass over the pile, so a higher pile lets go less often (at 1.5 the let-goes were a
# fifth of a 0.37B restore step's selection)
PILE = 2.0
BUCKETS = 1 << 16  # by the high 16 bits of a value's bit pattern: sign, exponent and 7 bits of mantissa


@dataclass
class Selection:
    values: torch.Tensor
    tensor_ids: torch.Tensor
    indices: torch.Tensor

    def by_tensor(self) -> dict[int, torch.Tensor]:
        """Selected flat indices grouped by tensor id, sorted: split where already so (the top-k's
        result, in offer order), else one sort by (tensor, index) first."""
        if self.indices.numel() == 0:
            return {}
        ids, indices = self.tensor_ids, self.indices
        same = ids[1:] == ids[:-1]
        ids_once = torch.unique_consecutive(ids).numel() == torch.unique(ids).numel()
        if not (ids_once and bool(((indices[1:] > indices[:-1]) | ~same).all())):
            order = torch.sort(ids * (int(indices.max()) + 1) + indices).indices
            ids, indices = ids[order], indices[order]
        ids, counts = torch.unique_consecutive(ids, return_counts=True)
        return dict(zip(ids.tolist(), torch.split(indices, counts.tolist())))

    def keep(self, which: torch.Tensor) -> Selection:
        return Selection(self.values[which], self.tensor_ids[which], self.indices[which])


def true_at(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices of a boolean tensor's true entries, ascending. On the CPU by numpy's
    flatnonzero: torch's nonzero took twice as long on two cores (a counting pass, then a filling
    one, each split across threads)."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.detach().reshape(-1).numpy()))
    return mask.flatten().nonzero().squeeze(1)


CHUNK = 1 << 18  # entries `beyond` tests at a time: its |value| and mask stay in the cache


def beyond(values: torch.Tensor, threshold: float) -> torch.Tensor:
    """Flat indices of the entries with |value| > threshold (threshold >= 0), ascending: one of a
    selection's passes over every gradient. numpy where it has the dtype (on two cores 1.7 ms for
    a 1024 x 2816 fp32 gradient against 4.1 ms for torch's comparisons and nonzero), CHUNK entries
    at a time, so the gradient is the only thing read from memory (3.5 ms against 5.3 ms whole,
    for such a gradient read from memory)."""
    if values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64, torch.float16):
        array = values.detach().reshape(-1).numpy()
        # compared in at least float32, where the threshold (a float32 score) is exact
        limit = np.asarray(threshold, np.result_type(array.dtype, np.float32))
        width = min(CHUNK, array.size)
        magnitude, above = np.empty(width, array.dtype), np.empty(width, bool)
        found = [np.empty(0, np.intp)]  # so that an empty gradient concatenates too
        for start in range(0, array.size, CHUNK):
            part = array[start : start + CHUNK]
            np.greater(np.abs(part, out=magnitude[: part.size]), limit, out=above[: part.size])
            found.append(np.flatnonzero(above[: part.size]) + start)
        return torch.from_numpy(np.concatenate(found))
    if values.element_size() < 4:
        values = values.float()
    return true_at((values > threshold) | (values < -threshold))


def _empty() -> Selection:
    return Selection(torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))


def _by_entry(selection: Selection) -> torch.Tensor:
    """Positions of `selection` in (tensor id, index) order: the order in which equal values rank."""
    key = selection.tensor_ids * (int(selection.indices.max()) + 1 if selection.indices.numel() else 1) + selection.indices
    return torch.sort(key, stable=True).indices


def top(selection: Selection, k: int) -> Selection:
    """The k best, best first (equal values by tensor id, then index)."""
    laid_out = _by_entry(selection)
    return selection.keep(laid_out[torch.sort(selection.values[laid_out], descending=True, stable=True).indices[:k]])


def _from_top(counts: torch.Tensor, rank: int) -> tuple[int, int]:
    """(bucket holding the rank-th largest entry, counting from 1; that entry's rank within it),
    from the entries' counts per bucket in ascending order."""
    above = counts.flip(0).cumsum(0)  # above[j]: entries in the j+1 highest buckets
    j = int(torch.searchsorted(above, rank))
    return counts.numel() - 1 - j, rank - (int(above[j - 1]) if j else 0)


def _keys(values: torch.Tensor) -> torch.Tensor:
    """float32 -> int32 keys that order as the numbers do (no NaN): the bit pattern, with the
    negatives' reversed and below the positives."""
    bits = values.contiguous().view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


_NEGATIVE_INFINITY = -0x7F800001  # the key of -inf; keys below it are NaN patterns


def _value(key: int) -> float:
    return float(torch.tensor([key ^ 0x7FFFFFFF if key < 0 else key], dtype=torch.int32).view(torch.float32))


def _bucket(keys: torch.Tensor) -> torch.Tensor:
    return (keys >> 16) + BUCKETS // 2


def kth_largest(values: torch.Tensor, k: int) -> float:
    """The k-th largest of float32 `values` (1 <= k <= numel; no NaN), by two counting passes over
    their keys (`_keys`): a fraction of a selection's time, and nothing is ordered."""
    keys = _keys(values)
    buckets = _bucket(keys)
    bucket, rank = _from_top(torch.bincount(buckets, minlength=BUCKETS), k)
    low, _ = _from_top(torch.bincount(keys[buckets == bucket] & 0xFFFF, minlength=BUCKETS), rank)
    return _value(((bucket - BUCKETS // 2) << 16) | low)


def _best(pool: Selection, k: int) -> tuple[Selection, float]:
    """The k best of `pool`, kept in its own order (everything above the k-th value, and of the
    entries equal to it those first by tensor id and index), and the k-th value."""
    cut = kth_largest(pool.values, k)
    keep = pool.values > cut
    ties = true_at(pool.values == cut)
    room = k - int(keep.sum())
    if ties.numel() > room:
        tied = pool.keep(ties)
        ties = ties[_by_entry(tied)[:room]]
    keep[ties] = True
    return pool.keep(true_at(keep)), cut  # resolved once, not once per array


class StreamingTopK:
    """Offer candidates tensor by tensor (in a fixed order); `result()` is the global top k.

    Every admitted candidate is counted in its bucket (`_bucket`); once k are counted, the k-th
    largest lies in a known bucket, and the threshold rises to just below it after every offer:
    later candidates at or below it are dropped on arrival, since k held ones rank above them.
    Nothing is ordered on the way: each offer is held as it came (its tensor id once, not per
    entry: 12 bytes an entry), and when PILE * k candidates are held, each part lets go of those at
    or below the threshold (an exact cut at the k-th value if ties in one bucket keep too many: the
    threshold then stays just below that value, since a later entry equal to it may rank first by
    tensor id); `result()` makes the one exact cut.
    """

    def __init__(self, k: int):
        self.k = k
        self._parts: list[_Part] = []
        self._size = 0
        self._counts = torch.zeros(BUCKETS, dtype=torch.long)
        self._counted = 0
        self._threshold: float | None = None

    @property
    def threshold(self) -> float | None:
        """Scores at or below this are dropped on arrival (None until k have been offered)."""
        return self._threshold

    def offer(self, tensor_id: int, values: torch.Tensor, indices: torch.Tensor) -> None:
        """values[i] is the score of flat entry indices[i] of tensor `tensor_id`; indices ascending."""
        part = _Part(tensor_id, values.detach().float().cpu(), indices.cpu())
        if self.k <= 0 or part.values.numel() == 0:
            return
        if self._threshold is not None:
            part = part.above(self._threshold)
            if part is None:
                return
        self._parts.append(part)
        self._size += part.values.numel()
        self._counts += torch.bincount(_bucket(_keys(part.values)), minlength=BUCKETS)
        self._counted += part.values.numel()
        self._raise(self._below(_from_top(self._counts, self.k)[0]) if self._counted >= self.k else None)
        if self._size > PILE * self.k:
            if self._threshold is not None:  # None while the k-th value is in -inf's bucket
                self._parts = [kept for part in self._parts if (kept := part.above(self._threshold)) is not None]
                self._size = sum(part.values.numel() for part in self._parts)
            if self._size > PILE * self.k:  # ties within one bucket
                pool, cut = _best(collect(self._parts), self.k)
                self._raise(float(np.nextafter(np.float32(cut), np.float32(-np.inf))))
                self._parts, self._size = _Part.split(pool), pool.values.numel()

    @staticmethod
    def _below(bucket: int) -> float | None:
        """The largest value under every value of `bucket` (None when nothing is: the bucket
        holds -inf, and the keys below it are NaN patterns)."""
        key = ((bucket - BUCKETS // 2) << 16) - 1
        if key < _NEGATIVE_INFINITY:
            return None
        return _value(-2 if key == -1 else key)  # key -1 is -0.0, which would drop +0.0 too

    def _raise(self, threshold: float | None) -> None:
        if threshold is not None and (self._threshold is None or threshold > self._threshold):
            self._threshold = threshold

    def result(self) -> Selection:
        """The global top k, in offer order (tensor by tensor, indices ascending)."""
        pool = collect(self._parts)
        return _best(pool, self.k)[0] if pool.values.numel() > self.k else pool


@dataclass
class _Part:
    """One offer's candidates still held: scores and entries of one tensor."""

    tensor_id: int
    values: torch.Tensor
    indices: torch.Tensor

    @property
    def tensor_ids(self) -> torch.Tensor:
        return torch.full_like(self.indices, self.tensor_id)

    def above(self, threshold: float) -> _Part | None:
        """The part without its entries at or below the threshold (None when none is left; itself
        when it has none: a caller that tested against the threshold offers none below it)."""
        keep = self.values > threshold
        if keep.all():
            return self
        at = true_at(keep)
        return _Part(self.tensor_id, self.values.index_select(0, at), self.indices.index_select(0, at)) if at.numel() else None

    @staticmethod
    def split(selection: Selection) -> list[_Part]:
        """A selection in offer order as parts (consecutive entries of one tensor)."""
        ids, counts = torch.unique_consecutive(selection.tensor_ids, return_counts=True)
        sizes = counts.tolist()
        return [_Part(t, v, i) for t, v, i in zip(ids.tolist(), torch.split(selection.values, sizes), torch.split(selection.indices, sizes))]


def collect(parts: list[Selection] | list[_Part]) -> Selection:
    """Concatenate selections (or a top-k's parts) in the order given (for sets already bounded by
    k), in one copy."""
    if not parts:
        return _empty()
    return Selection(torch.cat([p.values for p in parts]), torch.cat([p.tensor_ids for p in parts]), torch.cat([p.indices for p in parts]))
