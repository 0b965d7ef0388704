"""Resident memory of memory-mapped arrays: drop pages already read or written.

Torch-free (numpy's maps only), so the run store, which copies mapped score files, and the
streamed passes of the math layer (``precompute.streaming.release_pages``) share it.
"""

from __future__ import annotations

import mmap


def release_mapped_pages(array) -> None:
    """Drop a memory map's pages from this process's resident set (MADV_DONTNEED); no-op for
    anything that is not backed by a map.

    Safe for shared file maps: written pages stay dirty in the page cache and reach the file (flush
    once at the end); later reads fault pages back in.
    """
    mm = getattr(array, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise"):
        return
    try:
        mm.madvise(mmap.MADV_DONTNEED)
    except (OSError, ValueError):
        pass
