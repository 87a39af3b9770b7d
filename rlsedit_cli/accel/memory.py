"""Freed memory kept for the next allocation (``kept_pages``).

glibc maps a large block (above 128 KB, a threshold it raises up to 32 MB) fresh from the
kernel and unmaps it when freed, and returns the free top of its heap to the kernel past a trim
threshold: every pass's activations and every block of logits read (12 MB) then pays a page
fault per 4 KB page when first written, about a quarter of a bfloat16 log-softmax's time and
6% of a general-ability point's (docs/benchmarks.md section 5). With mmap off and a trim
threshold of 1 GiB (glibc's ``mallopt``), a freed block serves the next allocation as it is.

Process-wide and for the rest of the process (glibc has no way back to its moving thresholds;
its tunables are read only at start), and the process's memory stays near its peak. Where the C
library is not glibc (macOS, musl) nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
KEPT_BYTES = 1 << 30  # free heap top kept before it is returned to the kernel


def _glibc():
    """glibc's handle, or None where the C library is another."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 (glibc only)
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_pages() -> bool:
    """Have glibc keep freed memory for reuse (see the module); whether it now does."""
    libc = _glibc()
    if libc is None:
        return False
    kept = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, KEPT_BYTES))
    if not kept:
        log.debug("glibc refused mallopt: freed memory goes back to the kernel as before")
    return kept
