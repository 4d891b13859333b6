"""The records of the built-in post-hoc methods that keep one (their part of surgeon.json). No torch."""

from __future__ import annotations

from surgeon.records import MethodRecord


class DgHardRecord(MethodRecord):
    ranks_kept: dict[str, tuple[int, int]]  # update matrix -> (singular values kept, of how many)


class SafeLoraRecord(MethodRecord):
    cosines: dict[str, float]  # update matrix -> cosine of its projection onto the alignment matrix with itself
    projected: list[str]  # the matrices replaced by their projection
