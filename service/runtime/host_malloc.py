"""glibc's malloc set for a step loop's large temporaries: a process that hosts an engine calls `tune_malloc` once
(engine/build.py, when EngineSettings.tune_malloc).

Why. A cached step of tiny at 64 rows allocates and frees tensors of 1-17 MB every step (attention scores, their
softmax, the MLP's activations), in between the engine's own smaller allocations. glibc serves a block above its
mmap threshold with a fresh mmap and gives it back with munmap when it is freed, and gives the top of a heap back to
the kernel once it is larger than the trim threshold; the threshold moves by itself (it starts at 128 KiB and rises
only when such a block is freed), so under the engine's mix of sizes the step kept touching pages the kernel had
to hand out again: ~33 000 minor page faults a step at 64 rows (~130 MB zeroed by the kernel), the step 1.3x
slower than the same step without them (bench/reports/host_malloc.md). With the mmap threshold pinned at glibc's
ceiling (32 MiB on 64-bit) and trimming raised, those blocks are reused from the heap: no faults in steady state.

The cost: memory freed after a burst stays with the process (its RSS keeps the high-water mark of blocks under
32 MiB) instead of going back to the kernel: the trade every serving allocator makes (jemalloc and tcmalloc keep
freed memory too). Blocks over 32 MiB are mmapped as before. Not glibc (musl, macOS): nothing is done, and the
returned line says so.
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 1 << 30  # free heap top kept up to this much before it goes back to the kernel


def tune_malloc(mmap_threshold: int = MMAP_THRESHOLD_MAX, trim_threshold: int = TRIM_THRESHOLD) -> str:
    """Set the process's malloc thresholds (process-wide, every thread's arena; idempotent) -> a line for the log."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError):
        return "malloc left as it is: this C library has no mallopt (not glibc)"
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, mmap_threshold) != 1 or mallopt(M_TRIM_THRESHOLD, trim_threshold) != 1:
        return f"malloc left as it is: mallopt refused mmap_threshold={mmap_threshold} trim_threshold={trim_threshold}"
    return (f"malloc: blocks under {mmap_threshold >> 20} MiB reused from the heap, heap top kept up to "
            f"{trim_threshold >> 20} MiB (the step's temporaries do not fault pages in again each step)")


def glibc_tunables(mmap_threshold: int = MMAP_THRESHOLD_MAX, trim_threshold: int = TRIM_THRESHOLD) -> str:
    """The same settings for a process started from outside (its GLIBC_TUNABLES environment variable): what the
    peer bench gives the peer servers when they are to get them too (bench/peer_bench.py --peer-malloc)."""
    return f"glibc.malloc.mmap_threshold={mmap_threshold}:glibc.malloc.trim_threshold={trim_threshold}"
