"""Contracts of the KV page allocator and the prefix cache.

Page ownership is the invariant everything rests on: at any moment every page id is in exactly
one of three places: the allocator's free list, the prefix cache (a tree node owns it), or a
running request (allocated for it and not yet handed to the cache). Page 0 is reserved (never
allocated) so padded batches and CUDA graphs have a harmless slot to write to.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, NamedTuple, Sequence


class MatchResult(NamedTuple):
    """The longest cached prefix of a key, at page granularity.

    pages: page ids holding the matched tokens, in order (len == num_tokens // page_size).
    num_tokens: matched tokens, a multiple of the page size.
    node: handle to pass to `lock` / `unlock` (protects exactly these pages from eviction).
    """

    pages: list[int]
    num_tokens: int
    node: Any


class BasePageAllocator(ABC):
    """Free-page bookkeeping for the KV pool. Page ids are 1..num_pages-1 (0 is reserved)."""

    @property
    @abstractmethod
    def num_free(self) -> int: ...

    @abstractmethod
    def alloc(self, n: int) -> list[int] | None:
        """n free pages, or None (allocating nothing) when fewer than n are free."""

    @abstractmethod
    def free(self, pages: Sequence[int]) -> None:
        """Return pages; freeing a page that is already free raises ValueError."""


class BasePrefixCache(ABC):
    """A cache from token-id prefixes to the KV pages that hold them.

    - `match_prefix(key)`: the longest cached prefix (page-aligned); refreshes its LRU time.
      Counts hit/miss tokens only when `count=True` (once per admitted request).
    - `lock(node)` / `unlock(node)`: reference-count the path from `node` to the root; locked
      pages are never evicted. Every lock is paired with exactly one unlock.
    - `insert(key, pages)`: take ownership of the pages of the page-aligned prefix of `key`
      (len(pages) == len(key) // page_size). Returns how many leading tokens were already cached:
      the caller still owns `pages[:ret // page_size]` (duplicates of cached pages) and must
      free those it does not hold through a lock; the cache now owns the rest.
    - `evict(n)`: free at least n pages from unlocked leaves, least recently used first, back to
      the allocator; returns how many were freed (fewer when not enough are evictable).
    - `reset()`: drop every unlocked entry (flush); pages go back to the allocator.
    """

    def __init__(self, allocator: BasePageAllocator, page_size: int = 1) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.allocator = allocator
        self.page_size = page_size
        self.hit_tokens = 0  # prompt tokens served from the cache (counted matches only)
        self.miss_tokens = 0

    @abstractmethod
    def match_prefix(self, key: Sequence[int], count: bool = False) -> MatchResult: ...

    @abstractmethod
    def lock(self, node: Any) -> None: ...

    @abstractmethod
    def unlock(self, node: Any) -> None: ...

    @abstractmethod
    def insert(self, key: Sequence[int], pages: Sequence[int]) -> int: ...

    @abstractmethod
    def evict(self, num_pages: int) -> int: ...

    @abstractmethod
    def reset(self) -> None: ...

    @property
    @abstractmethod
    def num_cached_pages(self) -> int:
        """Pages the cache owns (locked or not)."""

    @property
    @abstractmethod
    def num_evictable_pages(self) -> int:
        """Pages evict() could free right now."""

    @property
    def hit_rate(self) -> float:
        total = self.hit_tokens + self.miss_tokens
        return self.hit_tokens / total if total else 0.0
