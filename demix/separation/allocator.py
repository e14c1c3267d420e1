"""Keeping freed memory for reuse: the C allocator's settings for a process running the model.

A forward allocates and frees tensors of tens of megabytes. glibc's malloc serves such
sizes with fresh `mmap`s, returns them to the kernel when freed and trims the heap's
free top, so every forward faulted its working memory in again, page by page, with the
kernel zeroing each page: on htdemucs about a sixth of a bf16 forward (a 1×1 convolution
spent 20 of its 24 ms in page faults). Serving every size from the heap (no `mmap`;
glibc's mmap threshold cannot go above 32 MiB, and a forward has larger tensors) and
keeping freed memory there lets the next window reuse the pages the last one touched: a
60-s htdemucs job in bf16 went from 0.45-0.83 million page faults to under 0.33 million
(most of them now the model's load), and its forwards from about 1.1 s to 0.9 s. The process's peak memory
stays what a forward needs; it is only no longer given back between windows.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import typing as tp

log = logging.getLogger(__name__)

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

TRIM_THRESHOLD = 1024 * 1024 * 1024
"""Free memory at the heap's top kept for reuse rather than given back: more than one
forward's working set (htdemucs in fp32: about 600 MB)."""

_applied: bool | None = None


def keep_freed_memory_for_reuse() -> bool:
    """Tune this process's malloc (glibc only; elsewhere a no-op); True if applied.
    Idempotent: call it when a process starts running the model."""
    global _applied
    if _applied is None:
        mallopt = _glibc_mallopt()
        _applied = mallopt is not None and mallopt(_M_MMAP_MAX, 0) == 1 \
            and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        if not _applied:
            log.info("malloc tuning not applied (not glibc): forwards fault their memory in afresh")
    return _applied


def _glibc_mallopt() -> tp.Optional[tp.Callable[[int, int], int]]:
    """glibc's `mallopt(3)`, or None where the C library has none."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt
