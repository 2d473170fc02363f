"""Keeping freed host memory for reuse, so that CPU training stops paying page faults every step.

A training step allocates and frees the same large activations, step after step. glibc's malloc
hands a freed block of more than its mmap threshold (32 MiB at most) straight back to the kernel,
and trims the top of its heap once more than twice that is free there, so the next step takes a
page fault for every 4 KiB it gets back. On this project's 2-core machine, `gptlab train` of
benchmarks/train_bench.py's model took 33,000-188,000 faults and 0.2-0.7 s of system time a
step of 2-3 s (BENCHMARKS.md); with this setting, none. PyTorch's CUDA caching allocator keeps
freed blocks for reuse on GPUs; keep_freed_memory asks glibc for the same on the host. The price
is that the process holds on to its peak memory until it ends, as a GPU run does.
"""

from __future__ import annotations

import ctypes
import sys

# mallopt's parameter numbers, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Serve every allocation from malloc's heap (never a block of its own from mmap) and never
    trim the heap, so that freed memory is reused without page faults. Returns whether it
    applied: glibc on Linux only; elsewhere (macOS, Windows, musl) it does nothing."""
    libc = _glibc()
    if libc is None:
        return False
    # mallopt returns 1 on success; -1 as M_TRIM_THRESHOLD turns trimming off (mallopt(3)).
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, -1))


def _glibc() -> ctypes.CDLL | None:
    """This process's C library when it is glibc, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the symbols already loaded into this process
        libc.gnu_get_libc_version  # noqa: B018 glibc's own function: musl has a mallopt that does nothing
        libc.mallopt  # noqa: B018 (only whether it exists matters)
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return libc
