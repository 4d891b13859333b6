"""Give freed tensor memory back to the operating system (glibc only; elsewhere a no-op).

glibc raises its mmap threshold each time a large block is freed, so after the first few
layers, layer-sized tensors come from the heap and their memory stays with the process:
peak RSS then follows model size although one layer is held at a time. Trimming the heap
once per layer returns it (measured on a 72-layer model: 0.90 -> 0.6x GiB peak RSS).
"""

import ctypes
import ctypes.util
import sys

_libc = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _libc.malloc_trim
    except (OSError, AttributeError):
        _libc = None


def release_free_memory() -> None:
    if _libc is not None:
        _libc.malloc_trim(0)
