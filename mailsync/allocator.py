"""glibc's allocator and a load's megabyte buffers.

A load's parts are megabytes each, and every part passes through a few
buffers of about that size (the spool's chunk, the sealed envelope, the
message). glibc serves an allocation that large from ``mmap`` — returned to
the system when freed — until the first such block is freed: it then raises
its threshold to that block's size for good, and later part-sized buffers
come from the heap, where small long-lived objects allocated between them
keep freed space from going back. A 1.4M-row load then peaked at tens of
MiB of freed-but-held heap (docs/benchmarks.md, issue 17). Pinning the
threshold keeps every buffer of a megabyte or more in ``mmap``; the cost is
a system call per such buffer, nothing beside a part's work.

Called once by the processes mailsync starts (:mod:`mailsync.entry`); a
program that embeds the library decides for its own process.
"""

from __future__ import annotations

import ctypes
import sys

#: glibc's ``M_MMAP_THRESHOLD`` parameter, and the value pinned
_M_MMAP_THRESHOLD = -3
THRESHOLD = 1024 * 1024


def pin_mmap_threshold() -> bool:
    """Pin glibc's mmap threshold (Linux with glibc only; elsewhere, or
    when the library is not found, nothing changes). Whether it did."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        # the interpreter's own symbols, libc's among them (no library search)
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False  # musl or another libc: its own policy stands
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, THRESHOLD))
