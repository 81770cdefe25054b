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

Finding a leak (`python -m tests.bench.soak --tracemalloc`): with
AIGNE_HUB_TRACEMALLOC_DIR set, a gateway process traces its allocations from start and
writes a snapshot (`<pid>-<n>.snap`) into that folder on each SIGUSR2; comparing two
snapshots names the lines whose allocations grew. Off (and nothing imported) otherwise:
tracing slows every allocation.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
import signal
from pathlib import Path

log = logging.getLogger(__name__)

TRACEMALLOC_DIR_VARIABLE = "AIGNE_HUB_TRACEMALLOC_DIR"
TRACEMALLOC_FRAMES = 8

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


def trace_allocations_if_asked() -> None:
    """With AIGNE_HUB_TRACEMALLOC_DIR set: traces allocations and writes a snapshot on
    each SIGUSR2 (see the module docstring). Call it from the running event loop."""
    folder = os.environ.get(TRACEMALLOC_DIR_VARIABLE)
    if not folder:
        return
    import asyncio
    import tracemalloc

    Path(folder).mkdir(parents=True, exist_ok=True)
    if not tracemalloc.is_tracing():
        tracemalloc.start(TRACEMALLOC_FRAMES)
    taken = 0

    def take() -> None:
        nonlocal taken
        taken += 1
        path = Path(folder) / f"{os.getpid()}-{taken:03d}.snap"
        snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
        snapshot.dump(str(path))
        log.warning("tracemalloc snapshot written to %s", path)

    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR2, take)
