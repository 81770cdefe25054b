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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
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
