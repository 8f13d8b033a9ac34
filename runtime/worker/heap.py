"""A CPU rank keeps the memory it frees (glibc's malloc), so each step reuses the previous step's pages.

A CPU decode step allocates and frees the same few tensors in every layer, and some grow with the context
(the gathered K/V of a step's sequences). glibc hands such blocks back to the kernel: a block over its mmap
threshold is unmapped when freed, and free space at the top of the heap beyond its trim threshold is
trimmed. Its dynamic rule sets those thresholds to the largest block freed so far (mmap) and twice that
(trim), so once a layer frees more than twice its largest tensor at once, every layer of every step gives its
memory back and faults it in again page by page. Measured with SmolLM2 at 4 sequences: a decode step went
from 55 ms at 1,280 tokens of context to 165 ms at 1,281 (~60,000 page faults, ~140 ms of system time per
step), and a tensor over 32 MiB (the largest mmap threshold glibc accepts; a batch of 32 long sequences
gathers more) is unmapped on every free whatever the rule. Here no block is mmapped (except, on a thread other
than the main one, such as the server's engine thread, a block over the 64 MiB of one of its arena's heaps) and
up to ``TRIM`` of free memory stays in the heap: the resident set keeps its high-water mark, as a serving
process wants.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
TRIM = 1 << 30  # free memory above this at the heap's top still goes back (one huge step does not pin it)


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory in this process (see the module); False where the C library is
    not glibc (nothing changed)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM))
