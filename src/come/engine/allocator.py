"""The C allocator's policy for a whole command: keep freed memory for reuse instead of returning it.

glibc's malloc serves every block above its mmap threshold (at most 32 MiB) with a fresh mapping and
unmaps it on free, and trims the top of its heap as soon as enough of it is free. A compression or a
distillation allocates and frees blocks of tens to hundreds of MB many times over (logits, Gram matrices,
their factors), so each new block is page-faulted in and zero-filled by the kernel again: system time
that grows with the FFN width (bench/results/cost_probes.md). A `come` command is one process that ends
when the work does, so it keeps what it freed instead; its peak RSS is measured in the same place.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_KEEP = 2**31 - 1  # mallopt takes an int: never trim below 2 GiB of free heap
ENV = "COME_KEEP_FREED_MEMORY"  # "0": leave the allocator as the platform set it


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to serve large blocks from its heap (no per-block mapping) and not to trim it.
    True if the policy is now in effect; False off glibc (or with COME_KEEP_FREED_MEMORY=0), where
    nothing changes. Only for a process that ends with its work: the memory stays with it until then."""
    if os.environ.get(ENV, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP))
