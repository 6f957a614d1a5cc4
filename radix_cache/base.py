"""Contracts of the KV page allocator and the prefix cache.

Page ownership is the invariant everything rests on: at any moment every page id is in exactly
one of three places: the allocator's free list, the prefix cache (a tree node owns it), or a
running request (allocated for it and not yet handed to the cache). Page 0 is reserved (never
allocated) so padded batches and CUDA graphs have a harmless slot to write to.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple, Sequence


class CacheInvariantError(RuntimeError):
    """check_invariants() found the cache inconsistent (a bug in the cache or its caller)."""


class CacheHandle:
    """Opaque proof of a match, for `lock` / `unlock`: only the cache that made it looks inside.

    Each implementation subclasses it with what it needs to pin exactly the matched pages
    (and to notice a handle whose pages were evicted since); callers only store and pass it.
    """

    __slots__ = ()


class MatchResult(NamedTuple):
    """The longest cached prefix of a key, at page granularity.

    pages: page ids holding the matched tokens, in order (len == num_tokens // page_size).
    num_tokens: matched tokens, a multiple of the page size.
    node: handle to pass to `lock` / `unlock` (protects exactly these pages from eviction).
    """

    pages: list[int]
    num_tokens: int
    node: CacheHandle


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

    @abstractmethod
    def is_free(self, page: int) -> bool:
        """Whether the page is on the free list (page 0 never is)."""


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
    - `check_invariants()`: raise CacheInvariantError unless page ownership is consistent
      (see there); implementations add their own structure checks in `_check_structure`.
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
    def lock(self, node: CacheHandle) -> None: ...

    @abstractmethod
    def unlock(self, node: CacheHandle) -> None: ...

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
    def num_locked_pages(self) -> int:
        """Pages pinned by some lock (never evicted until unlocked)."""

    @property
    def num_evictable_pages(self) -> int:
        """Pages evict() could free right now: every unlocked page (a lock pins a whole path,
        so an unlocked page is always reachable by evicting leaves)."""
        return self.num_cached_pages - self.num_locked_pages

    @abstractmethod
    def owned_pages(self) -> list[int]:
        """Every page the cache owns, each once (for leak checks)."""

    def check_invariants(self) -> None:
        """Raise CacheInvariantError unless ownership is consistent: the owned pages are
        distinct, never the reserved page 0, never on the allocator's free list, and as many as
        num_cached_pages; 0 <= num_locked_pages <= num_cached_pages. Then the implementation's
        own `_check_structure`. O(cached pages)."""
        seen: set[int] = set()
        for p in self.owned_pages():
            if p <= 0:
                raise CacheInvariantError(f"the cache holds reserved/invalid page {p}")
            if p in seen:
                raise CacheInvariantError(f"page {p} is owned twice by the cache")
            if self.allocator.is_free(p):
                raise CacheInvariantError(f"page {p} is cached and also in the allocator's free list")
            seen.add(p)
        if len(seen) != self.num_cached_pages:
            raise CacheInvariantError(f"the cache owns {len(seen)} pages but counts {self.num_cached_pages}")
        if not 0 <= self.num_locked_pages <= self.num_cached_pages:
            raise CacheInvariantError(f"{self.num_locked_pages} locked pages of {self.num_cached_pages} cached")
        self._check_structure()

    def _check_structure(self) -> None:
        """Implementation-specific consistency checks (raise CacheInvariantError)."""

    @property
    def hit_rate(self) -> float:
        total = self.hit_tokens + self.miss_tokens
        return self.hit_tokens / total if total else 0.0
