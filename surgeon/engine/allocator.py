"""Give freed tensor memory back to the operating system (glibc only; elsewhere a no-op).

glibc raises its mmap threshold each time a large block is freed, so after the first few
layers, layer-sized tensors come from the heap and their memory stays with the process:
peak RSS then follows model size although one layer is held at a time. `malloc_trim`
returns it, but trimming after every layer cost SmolLM2-135M 30% of its repair time, so
the heap is trimmed only once RSS has grown by SLACK since the last trim.
"""

import ctypes
import ctypes.util
import os
import sys

SLACK_BYTES = 256 * 2**20

_libc = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _libc.malloc_trim
    except (OSError, AttributeError):
        _libc = None
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_after_last_trim = [0]


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE


def release_free_memory() -> None:
    if _libc is None:
        return
    if _rss() - _after_last_trim[0] > SLACK_BYTES:
        _libc.malloc_trim(0)
        _after_last_trim[0] = _rss()
