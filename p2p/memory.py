"""Keep freed megabyte buffers in the process instead of handing them back to the kernel.

Why: a knowledge transfer allocates several 1 MiB buffers per chunk on each side (the
box's plaintext, libsodium's output, the framed record, the opened payload). glibc's
defaults serve an allocation that large with a fresh ``mmap`` or trim the heap top as
soon as ~128 KiB are free, so every chunk's buffers come back as new pages and each page
is faulted in again on first write: hundreds of minor faults per sealed MiB
(tests/unit/test_memory.py counts them; docs/performance.md "What the stream's CPU is
spent on" has what it costs). Raising
the mmap threshold and the trim threshold lets the allocator reuse the same warm pages
chunk after chunk. The cost is memory that stays with the process after a transfer: at
most the trim threshold of free heap (64 MiB) beyond what it uses.

glibc only (``mallopt``); elsewhere, or when the operator already set glibc's own
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` variables, nothing changes and
the reason is logged.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import structlog

log = structlog.get_logger(__name__)

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest allowed value on 64-bit: below it, the heap
TRIM_THRESHOLD = 64 * 1024 * 1024
GLIBC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_buffers(env: dict[str, str] | None = None) -> bool:
    """Set the two thresholds for this process; True when both took effect."""
    env = dict(os.environ) if env is None else env
    preset = [k for k in GLIBC_ENV if k in env]
    if preset:
        log.info("memory.malloc.unchanged", reason="set_by_environment", variables=preset)
        return False
    mallopt = _mallopt()
    if mallopt is None:
        log.info("memory.malloc.unchanged", reason="no_glibc_mallopt")
        return False
    ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if ok:
        log.info("memory.malloc.tuned", mmap_threshold=MMAP_THRESHOLD, trim_threshold=TRIM_THRESHOLD)
    else:
        log.warning("memory.malloc.unchanged", reason="mallopt_refused")
    return ok


def _mallopt():  # noqa: ANN202 — a ctypes function or None
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        fn = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return fn
