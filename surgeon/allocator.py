"""Give freed tensor memory back to the operating system (glibc only; elsewhere a no-op).

glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), so after the
first few layers, layer-sized tensors come from the heap and their memory stays with the
process: peak RSS then follows model size although one layer is held at a time. Setting the
threshold (MMAP_THRESHOLD) stops it sliding: blocks above it are mapped and unmapped, so their
memory returns when they are freed. bench/scale.py, one restore step at max_memory 256MiB: a
1.1B bf16 pair peaked at 1.66 GiB before and 1.32 GiB at 8 MiB (wall 44 -> 48 s), a 0.37B fp32
pair at 1.10 and 0.95 GiB (the same wall); 16 MiB kept 1.53 GiB, 1-4 MiB cost 15-30% of the wall
time (every per-batch activation mapped and zero-filled afresh).
What stays in the heap is trimmed with `malloc_trim`, but trimming after every layer cost
SmolLM2-135M 30% of its repair time, so only once RSS has grown by a slack since the last trim:
SLACK_BYTES, or a quarter of a smaller compute.max_memory (`fit_to_budget`). The engine calls it
after each layer, and forces it at the start of each pass; the writer calls it after each tensor.
Nothing changes at import: a run sets these when it builds its models (`fit_to_budget`), `surgeon
apply` before it writes (`streaming`), so a program that imports surgeon keeps its own allocator.

A mapped block comes back zero-filled from the kernel, a page fault at a time, each time it is
allocated: a layer's weights and weight gradients, every layer of every pass. So the threshold
holds only where compute.max_memory is set, a bound the run must keep; without one (the default)
blocks up to HEAP_THRESHOLD come from the heap, reused where they were freed, and only the slack's
trims return them. One restore step (bench/scale.py's pairs, half the free memory): 0.37B fp32
2.9-3.3 -> 2.6-2.7 s, 1.1B bf16 14.0 -> 11.1 s, 3.0B bf16 40.7 -> 33.1 s; peak RSS 1.53 -> 1.54,
3.56 -> 3.62, 6.99 -> 7.78 GiB.
"""

import ctypes
import ctypes.util
import os
import sys

SLACK_BYTES = 256 * 2**20
MMAP_THRESHOLD = 8 * 2**20
HEAP_THRESHOLD = 2**30
_M_MMAP_THRESHOLD = -3  # mallopt's parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_TRIM_DEFAULT = 128 * 1024  # glibc's, which holds once a threshold is set

_libc = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _libc.malloc_trim, _libc.mallopt  # both present, or this is not glibc
    except (OSError, AttributeError):
        _libc = None
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_after_last_trim = [0]
_slack = [SLACK_BYTES]


def slack_for(budget_bytes: int) -> int:
    """The slack a budget gets: a quarter of compute.max_memory where that is less than SLACK_BYTES,
    so that a small budget is not exceeded by the heap's free blocks."""
    return min(SLACK_BYTES, budget_bytes // 4)


def fit_to_budget(budget_bytes: int, bounded: bool = True) -> None:
    """Trim after `slack_for(budget_bytes)` of growth; `bounded`: the budget was set (blocks above
    MMAP_THRESHOLD are mapped), not the default (they come from the heap, below HEAP_THRESHOLD)."""
    _slack[0] = slack_for(budget_bytes)
    if _libc is not None:
        _libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD if bounded else HEAP_THRESHOLD)
        # free memory at the heap's top is given back past this (glibc's own trim): the slack's, not 128 KiB
        _libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_DEFAULT if bounded else _slack[0])


def streaming() -> None:
    """For work outside a run's budget that streams tensors one at a time (`surgeon apply`'s
    writer): each large block mapped, so it returns when freed, and a trim past SLACK_BYTES."""
    fit_to_budget(4 * SLACK_BYTES)


def slack() -> int:
    """How far the heap may grow past live data before a trim: memory a budget has to leave for it."""
    return _slack[0]


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE


def release_free_memory(force: bool = False) -> None:
    """Trim the heap once RSS has grown by the slack since the last trim (or now, with force)."""
    if _libc is None:
        return
    if force or _rss() - _after_last_trim[0] > _slack[0]:
        _libc.malloc_trim(0)
        _after_last_trim[0] = _rss()
