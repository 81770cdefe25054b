"""Process memory: large buffers go back to the operating system when freed.

glibc serves allocations above its mmap threshold (128 KiB at start) with their own
mappings, unmapped on free, but raises the threshold to the size of each such block
freed, up to 32 MiB. After a few multi-megabyte gRPC messages (up to
AIGNE_HUB_MAX_MESSAGE_BYTES each: the core's buffer, Python's bytes, the decoded
string) every later buffer of that size comes from the heap arenas instead, and freed
arena memory is rarely returned: a burst of 400 hostile calls with 1 to 8 MB fields
left the server ~600 MB above its start, with nothing alive. Fixing the threshold at
256 KiB keeps such buffers in their own mappings: after the same burst the RSS
settles ~110 MB above the start (165 MB with 1 MiB; tests/test_hostile_grpc.py holds
it under 200 MB). Smaller allocations, the hot path's, are unaffected.

Garbage collection. A call allocates a few thousand container objects (protos' Python
wrappers, dicts, coroutines, futures), nearly all freed by reference counting; with
CPython's default threshold (a young collection every 700 net allocations) the
collector ran ~50 times a second under load and took about 6 % of the server's CPU
(2 % after this, measured with gc.callbacks over the benchmark's chat run).
`tune_garbage_collection` moves what start-up built (modules, descriptors, config) out
of the collector's sight (`gc.freeze`) and collects the young generation every
`YOUNG_GC_THRESHOLD` allocations instead: reference cycles are still collected, a
little later.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
YOUNG_GC_THRESHOLD = 10_000
MMAP_THRESHOLD_BYTES = 256 * 1024


def return_large_buffers_to_the_os() -> bool:
    """Fixes glibc's mmap threshold; False (and nothing done) on another C library."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    if not done:
        log.warning("could not fix the C library's mmap threshold; RSS may stay high after large requests")
    return done


def tune_garbage_collection() -> None:
    """Once start-up is done: its objects frozen (the first time in a process only: a
    process that starts many gateways, the tests, would otherwise freeze each one's
    garbage-to-be), young collections less frequent."""
    global _frozen
    if not _frozen:
        gc.collect()
        gc.freeze()
        _frozen = True
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_GC_THRESHOLD, older, oldest)


_frozen = False
