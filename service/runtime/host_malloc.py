"""glibc's malloc set for a step loop's large temporaries: a process that hosts an engine calls `tune_malloc` once
(engine/build.py, when EngineSettings.tune_malloc).

Why. A cached step of tiny at 64 rows allocates and frees tensors of 1-17 MB every step (attention scores, their
softmax, the MLP's activations), in between the engine's own smaller allocations. glibc serves a block above its
mmap threshold with a fresh mmap and gives it back with munmap when it is freed, and gives the top of a heap back to
the kernel once it is larger than the trim threshold; the threshold moves by itself (it starts at 128 KiB and rises
only when such a block is freed), so under the engine's mix of sizes the step kept touching pages the kernel had to
hand out again: 10 000-33 000 minor page faults a step at 64 rows (40-130 MB zeroed by the kernel); without them the
engine makes 1.23x the frames/s at bf16 and 1.08x at fp32 (bench/reports/host_malloc.md). With the mmap threshold
pinned at glibc's ceiling (32 MiB on 64-bit) and trimming raised, those blocks are reused from the heap: no faults
in steady state. One arena (M_ARENA_MAX=1): the engine steps in a thread, and a thread's own arena grows in 64 MiB
heaps, which the step's fp32 temporaries outgrew now and then (thousands of faults a step again in some processes);
the main heap has no such bound. The engine's process has few threads, and Python's small objects never reach
malloc's lock (pymalloc), so one arena costs it no contention worth measuring.

The cost: memory freed after a burst stays with the process (its RSS keeps the high-water mark of blocks under 32
MiB) instead of going back to the kernel: the trade every serving allocator makes (jemalloc and tcmalloc keep freed
memory too). Blocks over 32 MiB are mmapped as before. Not glibc (musl, macOS): nothing is done, and the returned
line says so.
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 1 << 30  # free heap top kept up to this much before it goes back to the kernel


def tune_malloc(mmap_threshold: int = MMAP_THRESHOLD_MAX, trim_threshold: int = TRIM_THRESHOLD) -> str:
    """Set the process's malloc thresholds (process-wide, every thread's arena; idempotent) -> a line for the log."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError):
        return "malloc left as it is: this C library has no mallopt (not glibc)"
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    asked = {"mmap_threshold": (M_MMAP_THRESHOLD, mmap_threshold), "trim_threshold": (M_TRIM_THRESHOLD, trim_threshold),
             "arena_max": (M_ARENA_MAX, 1)}
    refused = [f"{k}={v}" for k, (opt, v) in asked.items() if mallopt(opt, v) != 1]
    if refused:
        return f"malloc partly left as it is: mallopt refused {', '.join(refused)}"
    return (f"malloc: blocks under {mmap_threshold >> 20} MiB reused from one heap, its top kept up to "
            f"{trim_threshold >> 20} MiB (the step's temporaries do not fault pages in again each step)")


def glibc_tunables(mmap_threshold: int = MMAP_THRESHOLD_MAX, trim_threshold: int = TRIM_THRESHOLD) -> str:
    """The same settings for a process started from outside (its GLIBC_TUNABLES environment variable): what the
    peer bench gives the peer servers when they are to get them too (bench/peer_bench.py --peer-malloc)."""
    return (f"glibc.malloc.mmap_threshold={mmap_threshold}:glibc.malloc.trim_threshold={trim_threshold}"
            ":glibc.malloc.arena_max=1")
