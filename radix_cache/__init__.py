"""KV page allocator and prefix caches (radix tree, or none for --disable-radix-cache)."""

from .allocator import PageAllocator
from .base import BasePageAllocator, BasePrefixCache, CacheHandle, CacheInvariantError, MatchResult
from .no_prefix_cache import NoPrefixCache
from .radix_tree import RadixCache, StaleHandleError

__all__ = [
    "BasePageAllocator",
    "BasePrefixCache",
    "CacheHandle",
    "CacheInvariantError",
    "MatchResult",
    "NoPrefixCache",
    "PageAllocator",
    "RadixCache",
    "StaleHandleError",
]
