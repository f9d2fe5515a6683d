"""glibc malloc settings for metalearn's own processes (the `metalearn` command and its DDP ranks).

A second-order meta-iteration on the CPU allocates and frees activation-sized buffers of a few MiB
hundreds of times. glibc serves buffers above its dynamic mmap threshold with fresh `mmap` pages and
hands freed heap tops back to the kernel, so every meta-iteration page-faults its working memory in
again. Fixing the mmap threshold at 32 MiB and keeping up to 1 GiB of freed heap makes those buffers
reused memory: 14% off an Omniglot 5-way 1-shot meta-iteration on a 2-core CPU, neutral on larger ones
(BENCHMARKS.md, "Speed"). The cost is that the process keeps its peak heap resident, as PyTorch's GPU
caching allocator does. Nothing is changed where the user has set malloc's own variables, where
METALEARN_MALLOC=default, or off glibc (macOS, musl).
"""

from __future__ import annotations

import ctypes
import os
import sys

#: mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 2**30
#: environment variables through which a user sets malloc up themselves
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES", "LD_PRELOAD")


def keep_freed_memory() -> bool:
    """Apply the settings above; whether they were applied."""
    if os.environ.get("METALEARN_MALLOC", "") == "default" or any(name in os.environ for name in USER_SETTINGS):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
