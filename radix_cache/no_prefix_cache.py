"""The prefix cache used with --disable-radix-cache: the same interface, caching nothing."""

from __future__ import annotations

from typing import Sequence

from .base import BasePrefixCache, CacheHandle, MatchResult

_NO_MATCH = CacheHandle()  # the handle of the empty match (pins nothing)


class NoPrefixCache(BasePrefixCache):
    """A BasePrefixCache that never holds a page, so callers need no special case.

    - `match_prefix` matches nothing (an empty handle; `count=True` counts every token a miss).
    - `lock` / `unlock` accept any handle and do nothing.
    - `insert(key, pages)` takes ownership of nothing and returns len(key) rounded down to a page
      multiple, i.e. "everything was already cached": by the base contract the caller still owns
      all of `pages` and, holding none of them through a lock, frees them all itself.
    - `evict` frees nothing (returns 0); `reset` does nothing.
    """

    def match_prefix(self, key: Sequence[int], count: bool = False) -> MatchResult:
        if count:
            self.miss_tokens += len(key)
        return MatchResult([], 0, _NO_MATCH)

    def lock(self, node: CacheHandle) -> None:
        pass

    def unlock(self, node: CacheHandle) -> None:
        pass

    def insert(self, key: Sequence[int], pages: Sequence[int]) -> int:
        aligned = len(key) - len(key) % self.page_size
        if len(pages) != aligned // self.page_size:
            raise ValueError(f"insert needs len(key) // page_size = {aligned // self.page_size} pages, "
                             f"got {len(pages)}")
        return aligned

    def evict(self, num_pages: int) -> int:
        return 0

    def reset(self) -> None:
        pass

    @property
    def num_cached_pages(self) -> int:
        return 0

    @property
    def num_locked_pages(self) -> int:
        return 0

    def owned_pages(self) -> list[int]:
        return []
