"""The free-page allocator of the KV pool.

The scheduler calls `alloc` / `free` every step, so both stay in plain Python lists and a
bytearray of flags: no per-page objects, no torch. Page 0 is reserved (see base.py) and is never
handed out.
"""

from __future__ import annotations

from operator import index
from typing import Sequence

from .base import BasePageAllocator


class PageAllocator(BasePageAllocator):
    """Hands out page ids 1..num_pages-1.

    - `alloc(n)`: n distinct free pages, or None (allocating nothing) when fewer than n are free.
      Fresh pages come out in ascending order, so a new allocator's first pages are 1, 2, 3...
    - `free(pages)`: every id must be in range and currently allocated (a page listed twice in
      one call counts as a double free); on a bad id it raises ValueError and changes nothing.
    - Cost: alloc is O(n), free is O(n), both independent of the pool size.
    """

    def __init__(self, num_pages: int) -> None:
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is reserved), got {num_pages}")
        self._num_pages = num_pages
        # A stack whose top is the smallest id: recently freed pages are reused first, which keeps
        # the working set of the pool small and its allocation order deterministic.
        self._free: list[int] = list(range(num_pages - 1, 0, -1))
        # 1 = free. A flag per page makes double-free detection O(1) without a set of ints.
        self._is_free = bytearray(b"\x01") * num_pages
        self._is_free[0] = 0

    @property
    def num_pages(self) -> int:
        """Size of the page table, reserved page 0 included."""
        return self._num_pages

    @property
    def num_total(self) -> int:
        """Usable pages (page 0 excluded)."""
        return self._num_pages - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self._num_pages - 1 - len(self._free)

    def alloc(self, n: int) -> list[int] | None:
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of pages ({n})")
        if n > len(self._free):
            return None
        if n == 0:
            return []
        pages = self._free[-n:]
        del self._free[-n:]
        pages.reverse()
        flags = self._is_free
        for p in pages:
            flags[p] = 0
        return pages

    def free(self, pages: Sequence[int]) -> None:
        if not len(pages):
            return
        flags = self._is_free
        # index() turns tensor / numpy scalars into ints so the free list only ever holds ints.
        ids = [index(p) for p in pages]
        for i, p in enumerate(ids):
            if p <= 0 or p >= self._num_pages or flags[p]:
                for q in ids[:i]:  # roll back this call's marks
                    flags[q] = 0
                if p <= 0 or p >= self._num_pages:
                    raise ValueError(f"page id {p} out of range 1..{self._num_pages - 1}")
                raise ValueError(f"double free of page {p}")
            flags[p] = 1
        # Reversed so that an immediate alloc(len(ids)) hands the same pages back in the same order.
        ids.reverse()
        self._free.extend(ids)

    def is_free(self, page: int) -> bool:
        """Whether `page` is currently in the free list (False for the reserved page 0)."""
        if page < 0 or page >= self._num_pages:
            raise ValueError(f"page id {page} out of range 0..{self._num_pages - 1}")
        return bool(self._is_free[page])

    def free_pages(self) -> list[int]:
        """A copy of the free list (debugging and leak checks)."""
        return list(self._free)
