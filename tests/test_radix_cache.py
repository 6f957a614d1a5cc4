"""Tests of radix_cache/: the page allocator, the radix prefix cache and NoPrefixCache.

The unit tests pin down each behaviour; the hypothesis state machine drives random request
lifecycles (match+lock, chunked insert+relock, finish, abort, evict, reset) and checks after
every step that each page is in exactly one place: free, in the tree, or held by a request.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from radix_cache import (
    CacheHandle,
    CacheInvariantError,
    MatchResult,
    NoPrefixCache,
    PageAllocator,
    RadixCache,
    StaleHandleError,
)


def tree_map(cache: RadixCache) -> dict[tuple[int, ...], int]:
    """The tree as {page-aligned token prefix: page id holding that prefix's last page}."""
    out: dict[tuple[int, ...], int] = {}
    stack = [(cache._root, ())]
    while stack:
        node, prefix = stack.pop()
        for child in node.children.values():
            path = prefix
            for i, page in enumerate(child.pages):
                path = prefix + tuple(child.key[: (i + 1) * cache.page_size])
                out[path] = page
            stack.append((child, path))
    return out


def cache_with(num_pages: int = 64, page_size: int = 1) -> tuple[PageAllocator, RadixCache]:
    alloc = PageAllocator(num_pages)
    return alloc, RadixCache(alloc, page_size)


def put(alloc: PageAllocator, cache: RadixCache, key: list[int]) -> list[int]:
    """Insert key with freshly allocated pages, freeing duplicates like a finishing request."""
    pages = alloc.alloc(len(key) // cache.page_size)
    already = cache.insert(key, pages)
    alloc.free(pages[: already // cache.page_size])
    return pages


# ---------------------------------------------------------------------- allocator


class TestPageAllocator:
    def test_counts_and_order(self):
        a = PageAllocator(8)
        assert (a.num_total, a.num_free, a.num_used) == (7, 7, 0)
        assert a.alloc(3) == [1, 2, 3]
        assert a.alloc(0) == []
        assert (a.num_free, a.num_used) == (4, 3)
        assert not a.is_free(0) and not a.is_free(2) and a.is_free(4)

    def test_alloc_too_many_allocates_nothing(self):
        a = PageAllocator(5)
        a.alloc(2)
        assert a.alloc(3) is None
        assert a.num_free == 2
        assert sorted(a.alloc(2)) == [3, 4]
        assert a.alloc(1) is None

    def test_free_and_reuse(self):
        a = PageAllocator(10)
        pages = a.alloc(9)
        a.free([5, 2, 7])
        assert a.num_free == 3
        assert a.alloc(3) == [5, 2, 7]  # freed pages come back first, in the same order
        a.free(pages)
        assert sorted(a.free_pages()) == list(range(1, 10))

    def test_double_free_raises_and_changes_nothing(self):
        a = PageAllocator(10)
        a.alloc(4)
        a.free([1])
        with pytest.raises(ValueError, match="double free"):
            a.free([2, 1])
        assert a.num_free == 6 and not a.is_free(2)
        with pytest.raises(ValueError, match="double free"):
            a.free([3, 3])
        assert a.num_free == 6 and not a.is_free(3)

    @pytest.mark.parametrize("bad", [0, -1, 10, 99])
    def test_free_out_of_range(self, bad):
        a = PageAllocator(10)
        a.alloc(9)
        with pytest.raises(ValueError, match="out of range"):
            a.free([1, bad])
        assert a.num_free == 0 and not a.is_free(1)

    def test_accepts_integer_scalars(self):
        a = PageAllocator(10)
        pages = np.array(a.alloc(3), dtype=np.int64)
        a.free(pages)
        assert all(type(p) is int for p in a.free_pages())
        assert a.num_free == 9

    def test_invalid_arguments(self):
        with pytest.raises(ValueError):
            PageAllocator(1)
        with pytest.raises(ValueError):
            PageAllocator(4).alloc(-1)


# ---------------------------------------------------------------------- radix cache, page_size 1


class TestRadixCachePage1:
    def test_empty_match(self):
        _, cache = cache_with()
        m = cache.match_prefix([1, 2, 3])
        assert isinstance(m, MatchResult)
        assert (m.pages, m.num_tokens) == ([], 0)
        cache.lock(m.node)  # the empty match pins nothing
        assert cache.num_locked_pages == 0
        cache.unlock(m.node)
        cache.check_invariants()

    def test_insert_and_match(self):
        alloc, cache = cache_with()
        pages = put(alloc, cache, [10, 11, 12, 13])
        assert cache.num_cached_pages == 4 and cache.num_nodes == 1
        m = cache.match_prefix([10, 11, 12, 13, 14, 15])
        assert (m.pages, m.num_tokens) == (pages, 4)
        assert cache.match_prefix([10, 11, 12, 13]).pages == pages
        assert cache.match_prefix([11]).num_tokens == 0
        cache.check_invariants()

    def test_partial_match_splits_node(self):
        alloc, cache = cache_with()
        pages = put(alloc, cache, [1, 2, 3, 4, 5])
        m = cache.match_prefix([1, 2, 3, 9])
        assert (m.pages, m.num_tokens) == (pages[:3], 3)
        assert cache.num_nodes == 2  # [1,2,3] -> [4,5]
        # Locking the split head pins exactly its pages; the tail stays evictable.
        cache.lock(m.node)
        assert (cache.num_locked_pages, cache.num_evictable_pages) == (3, 2)
        assert cache.evict(10) == 2
        assert cache.match_prefix([1, 2, 3, 4, 5]).num_tokens == 3
        cache.unlock(m.node)
        cache.check_invariants()

    def test_insert_branch_and_duplicates(self):
        alloc, cache = cache_with()
        first = put(alloc, cache, [1, 2, 3, 4])
        free_before = alloc.num_free
        second = alloc.alloc(5)
        already = cache.insert([1, 2, 7, 8, 9], second)
        assert already == 2  # [1, 2] was cached: caller keeps second[:2] and frees them
        assert cache.num_cached_pages == 4 + 3
        alloc.free(second[:2])
        assert alloc.num_free == free_before - 3
        assert cache.num_nodes == 3  # [1,2] -> {[3,4], [7,8,9]}
        assert cache.match_prefix([1, 2, 7, 8, 9]).pages == first[:2] + second[2:]
        assert cache.match_prefix([1, 2, 3, 4]).pages == first
        # A full duplicate changes nothing.
        again = alloc.alloc(4)
        assert cache.insert([1, 2, 3, 4], again) == 4
        alloc.free(again)
        assert cache.num_cached_pages == 7
        cache.check_invariants()

    def test_insert_extends_a_leaf(self):
        alloc, cache = cache_with()
        first = put(alloc, cache, [1, 2])
        more = alloc.alloc(4)
        assert cache.insert([1, 2, 3, 4], more) == 2
        alloc.free(more[:2])
        assert cache.match_prefix([1, 2, 3, 4]).pages == first + more[2:]
        assert cache.num_nodes == 2
        cache.check_invariants()

    def test_insert_validates_page_count(self):
        alloc, cache = cache_with()
        with pytest.raises(ValueError):
            cache.insert([1, 2, 3], alloc.alloc(2))
        with pytest.raises(ValueError):
            cache.insert([1], [0])

    def test_lock_protects_from_eviction(self):
        alloc, cache = cache_with()
        a = put(alloc, cache, [1, 2, 3])
        b = put(alloc, cache, [5, 6])
        m = cache.match_prefix([1, 2, 3])
        cache.lock(m.node)
        cache.lock(m.node)  # two requests share it
        assert cache.num_evictable_pages == 2
        assert cache.evict(100) == 2
        assert alloc.is_free(b[0]) and not alloc.is_free(a[0])
        cache.unlock(m.node)
        assert cache.evict(100) == 0  # still locked once
        cache.unlock(m.node)
        assert cache.num_evictable_pages == 3
        assert cache.evict(100) == 3
        assert cache.num_cached_pages == 0 and alloc.num_free == alloc.num_total
        cache.check_invariants()

    def test_lock_of_ancestor_path(self):
        alloc, cache = cache_with()
        put(alloc, cache, [1, 2, 3, 4])
        put(alloc, cache, [1, 2, 5, 6])
        m = cache.match_prefix([1, 2, 3, 4])
        cache.lock(m.node)
        # The sibling [5,6] can go, the shared [1,2] and the locked [3,4] cannot.
        assert cache.num_evictable_pages == 2
        assert cache.evict(5) == 2
        assert cache.match_prefix([1, 2, 5, 6]).num_tokens == 2
        cache.unlock(m.node)
        cache.check_invariants()

    def test_unbalanced_unlock_and_stale_handle(self):
        alloc, cache = cache_with()
        put(alloc, cache, [1, 2, 3])
        m = cache.match_prefix([1, 2, 3])
        with pytest.raises(StaleHandleError):
            cache.unlock(m.node)
        cache.evict(1)  # trims the matched node before it was locked
        with pytest.raises(StaleHandleError):
            cache.lock(m.node)
        m2 = cache.match_prefix([1, 2])
        cache.evict(10)  # drops it entirely
        with pytest.raises(StaleHandleError):
            cache.lock(m2.node)
        with pytest.raises(TypeError):
            cache.lock(None)
        assert cache.num_locked_pages == 0
        cache.check_invariants()

    def test_split_keeps_locked_handle_valid(self):
        alloc, cache = cache_with()
        put(alloc, cache, [1, 2, 3, 4])
        m = cache.match_prefix([1, 2, 3, 4])
        cache.lock(m.node)
        put(alloc, cache, [1, 2, 9])  # splits the locked node at 2
        assert cache.num_nodes == 3
        assert cache.num_locked_pages == 4
        assert cache.match_prefix([1, 2, 3, 4]).pages == m.pages
        cache.unlock(m.node)
        assert cache.num_locked_pages == 0
        cache.check_invariants()

    def test_lru_order(self):
        alloc, cache = cache_with()
        a = put(alloc, cache, [1, 1])
        b = put(alloc, cache, [2, 2])
        c = put(alloc, cache, [3, 3])
        cache.match_prefix([1, 1, 7])  # a is now the most recent
        assert cache.evict(2) == 2
        assert all(alloc.is_free(p) for p in b)
        assert cache.evict(2) == 2
        assert all(alloc.is_free(p) for p in c)
        assert not any(alloc.is_free(p) for p in a)
        cache.check_invariants()

    def test_evict_trims_the_tail_of_a_leaf(self):
        alloc, cache = cache_with()
        pages = put(alloc, cache, [1, 2, 3, 4, 5])
        assert cache.evict(2) == 2
        assert alloc.is_free(pages[3]) and alloc.is_free(pages[4])
        m = cache.match_prefix([1, 2, 3, 4, 5])
        assert (m.pages, m.num_tokens) == (pages[:3], 3)
        cache.check_invariants()

    def test_parent_becomes_evictable_leaf(self):
        alloc, cache = cache_with()
        put(alloc, cache, [1, 2, 3])
        put(alloc, cache, [1, 2, 4])
        put(alloc, cache, [9])
        cache.match_prefix([9])  # [9] most recent: the whole [1,2] subtree goes first
        assert cache.evict(4) == 4
        assert cache.match_prefix([1, 2]).num_tokens == 0
        assert cache.match_prefix([9]).num_tokens == 1
        assert cache.num_nodes == 1
        cache.check_invariants()

    def test_evict_more_than_evictable(self):
        alloc, cache = cache_with()
        put(alloc, cache, [1, 2, 3])
        assert cache.evict(0) == 0
        assert cache.evict(100) == 3
        assert cache.evict(1) == 0

    def test_reset_keeps_locked(self):
        alloc, cache = cache_with()
        put(alloc, cache, [1, 2, 3, 4])
        put(alloc, cache, [1, 2, 5])
        put(alloc, cache, [7, 8])
        m = cache.match_prefix([1, 2, 3])
        cache.lock(m.node)
        cache.reset()
        assert cache.num_cached_pages == 3 == cache.num_locked_pages
        assert alloc.num_free == alloc.num_total - 3
        assert cache.match_prefix([1, 2, 3, 4]).pages == m.pages
        cache.unlock(m.node)
        cache.reset()
        assert cache.num_cached_pages == 0 and cache.num_nodes == 0
        assert alloc.num_free == alloc.num_total
        cache.check_invariants()

    def test_hit_miss_counted_only_when_asked(self):
        alloc, cache = cache_with()
        put(alloc, cache, [1, 2, 3])
        cache.match_prefix([1, 2, 3, 4])
        assert (cache.hit_tokens, cache.miss_tokens) == (0, 0)
        cache.match_prefix([1, 2, 3, 4], count=True)
        cache.match_prefix([5, 6], count=True)
        assert (cache.hit_tokens, cache.miss_tokens) == (3, 3)
        assert cache.hit_rate == 0.5
        cache.reset()
        assert cache.hit_tokens == 3  # cumulative statistics survive a flush

    def test_sequence_types(self):
        alloc, cache = cache_with()
        pages = alloc.alloc(3)
        assert cache.insert(np.array([4, 5, 6]), np.array(pages)) == 0
        assert cache.match_prefix((4, 5, 6)).pages == pages
        assert cache.match_prefix(np.array([4, 5])).num_tokens == 2
        assert all(type(p) is int for p in cache.owned_pages())
        cache.check_invariants()

    def test_check_invariants_detects_corruption(self):
        alloc, cache = cache_with()
        put(alloc, cache, [1, 2, 3])
        put(alloc, cache, [4, 5])
        node = cache._root.children[4]
        node.pages[0] = cache._root.children[1].pages[0]
        with pytest.raises(CacheInvariantError, match="twice"):
            cache.check_invariants()


# ---------------------------------------------------------------------- radix cache, page_size 4


class TestRadixCachePage4:
    def test_match_rounds_down_to_pages(self):
        alloc, cache = cache_with(page_size=4)
        pages = alloc.alloc(2)
        assert cache.insert(list(range(10)), pages) == 0  # only the 8 page-aligned tokens count
        assert cache.num_cached_pages == 2
        assert cache.match_prefix(list(range(10))).num_tokens == 8
        m = cache.match_prefix(list(range(7)))
        assert (m.pages, m.num_tokens) == (pages[:1], 4)
        assert cache.match_prefix([0, 1, 2]).num_tokens == 0
        cache.check_invariants()

    def test_divergence_inside_a_page(self):
        alloc, cache = cache_with(page_size=4)
        first = put(alloc, cache, list(range(12)))
        key = [0, 1, 2, 3, 4, 5, 99, 7, 8, 9, 10, 11]
        m = cache.match_prefix(key)
        assert (m.pages, m.num_tokens) == (first[:1], 4)  # page 2 differs at its 3rd token
        second = alloc.alloc(3)
        assert cache.insert(key, second) == 4
        alloc.free(second[:1])
        assert cache.num_nodes == 3 and cache.num_cached_pages == 5
        assert cache.match_prefix(key).pages == first[:1] + second[1:]
        assert cache.match_prefix(list(range(12))).pages == first
        cache.check_invariants()

    def test_lock_evict_reset(self):
        alloc, cache = cache_with(num_pages=16, page_size=4)
        put(alloc, cache, list(range(16)))
        m = cache.match_prefix(list(range(9)))
        assert m.num_tokens == 8
        cache.lock(m.node)
        assert (cache.num_locked_pages, cache.num_evictable_pages) == (2, 2)
        assert cache.evict(5) == 2
        cache.reset()
        assert cache.num_cached_pages == 2
        cache.unlock(m.node)
        cache.reset()
        assert alloc.num_free == alloc.num_total
        cache.check_invariants()

    def test_insert_validates_page_count(self):
        alloc, cache = cache_with(page_size=4)
        with pytest.raises(ValueError):
            cache.insert(list(range(7)), alloc.alloc(2))


# ---------------------------------------------------------------------- no prefix cache


def test_no_prefix_cache():
    alloc = PageAllocator(16)
    cache = NoPrefixCache(alloc, page_size=4)
    m = cache.match_prefix(list(range(10)), count=True)
    assert (m.pages, m.num_tokens) == ([], 0)
    cache.lock(m.node)
    pages = alloc.alloc(3)
    ret = cache.insert(list(range(13)), pages)
    assert ret == 12  # the caller owns and frees all three pages
    alloc.free(pages[: ret // 4])
    cache.unlock(m.node)
    assert alloc.num_free == alloc.num_total
    assert (cache.num_cached_pages, cache.num_evictable_pages, cache.evict(5)) == (0, 0, 0)
    assert (cache.hit_tokens, cache.miss_tokens, cache.hit_rate) == (0, 10, 0.0)
    cache.reset()
    with pytest.raises(ValueError):
        cache.insert([1, 2, 3, 4], [])


@pytest.mark.parametrize("make", [RadixCache, NoPrefixCache])
def test_interface_contract(make):
    """What callers rely on from every BasePrefixCache: typed handles, evictable == cached -
    locked, and the ownership checks of the base class."""
    alloc = PageAllocator(16)
    cache = make(alloc, page_size=2)
    pages = alloc.alloc(3)
    already = cache.insert([1, 2, 3, 4, 5, 6], pages)
    alloc.free(pages[: already // 2])  # the caller's duplicates
    m = cache.match_prefix([1, 2, 3, 4, 5, 6, 7])
    assert isinstance(m, MatchResult) and isinstance(m.node, CacheHandle)
    cache.lock(m.node)
    assert cache.num_locked_pages == len(m.pages) == m.num_tokens // 2
    assert cache.num_evictable_pages == cache.num_cached_pages - cache.num_locked_pages
    assert sorted(cache.owned_pages()) == sorted(set(cache.owned_pages()))
    cache.check_invariants()
    cache.unlock(m.node)
    cache.check_invariants()


def test_check_invariants_catches_a_cached_page_on_the_free_list():
    alloc = PageAllocator(16)
    cache = RadixCache(alloc, page_size=2)
    pages = alloc.alloc(2)
    cache.insert([1, 2, 3, 4], pages)
    cache.check_invariants()
    alloc.free(pages[1:])  # a caller bug: the cache owns this page
    with pytest.raises(CacheInvariantError, match="free list"):
        cache.check_invariants()


# ---------------------------------------------------------------------- state machine


@dataclass
class SimRequest:
    key: list[int]
    node: object
    pages: list[int]  # tree pages (locked) first, then pages the request owns
    num_tree_pages: int


keys = st.lists(st.integers(0, 2), max_size=14)


class CacheMachine(RuleBasedStateMachine):
    """Random request lifecycles against a reference map of what the tree should hold."""

    @initialize(page_size=st.sampled_from([1, 2, 4]), num_pages=st.integers(4, 40))
    def setup(self, page_size, num_pages):
        self.ps = page_size
        self.alloc = PageAllocator(num_pages)
        self.cache = RadixCache(self.alloc, page_size)
        self.reqs: list[SimRequest] = []
        self.model: dict[tuple[int, ...], int] = {}  # page-aligned prefix -> page id
        self.history: list[list[int]] = []  # keys of all requests so far

    def expected_match(self, key: list[int]) -> list[int]:
        pages = []
        for end in range(self.ps, len(key) + 1, self.ps):
            page = self.model.get(tuple(key[:end]))
            if page is None:
                break
            pages.append(page)
        return pages

    def match(self, key: list[int], count: bool = False) -> MatchResult:
        m = self.cache.match_prefix(key, count=count)
        assert m.pages == self.expected_match(key)
        assert m.num_tokens == len(m.pages) * self.ps
        return m

    def evict(self, n: int) -> int:
        evictable, before = self.cache.num_evictable_pages, tree_map(self.cache)
        freed = self.cache.evict(n)
        assert freed == min(max(n, 0), evictable)
        after = tree_map(self.cache)
        # Eviction only removes, keeps the tree prefix-closed and never touches locked pages.
        assert after.items() <= before.items()
        assert len(before) - len(after) == freed
        for prefix in after:
            assert len(prefix) == self.ps or prefix[: -self.ps] in after
        self.model = after
        return freed

    def insert(self, req: SimRequest, num_tokens: int) -> None:
        """Hand req's first num_tokens//ps pages to the cache, like a finishing request."""
        full = num_tokens // self.ps
        key = req.key[: full * self.ps]
        expected_already = len(self.expected_match(key))
        already = self.cache.insert(key, req.pages[:full]) // self.ps
        assert already == expected_already >= req.num_tree_pages
        self.alloc.free(req.pages[req.num_tree_pages : already])
        for j in range(already, full):
            self.model[tuple(key[: (j + 1) * self.ps])] = req.pages[j]

    @rule(data=st.data())
    def start_request(self, data):
        # Half the time extend a prefix of an earlier key, so matches run deep and end anywhere.
        key = data.draw(keys)
        if self.history and data.draw(st.booleans()):
            base = data.draw(st.sampled_from(self.history))
            key = base[: data.draw(st.integers(0, len(base)))] + key[: data.draw(st.integers(0, 4))]
        self.history.append(key)
        m = self.match(key, count=True)
        self.cache.lock(m.node)
        need = -(-len(key) // self.ps) - len(m.pages)
        if self.alloc.num_free < need:
            self.evict(need - self.alloc.num_free)
        own = self.alloc.alloc(need)
        if own is None:
            assert self.alloc.num_free + self.cache.num_evictable_pages < need
            self.cache.unlock(m.node)
            return
        self.reqs.append(SimRequest(list(key), m.node, m.pages + own, len(m.pages)))

    @precondition(lambda self: self.reqs)
    @rule(data=st.data(), store=st.booleans())
    def finish_request(self, data, store):
        req = self.reqs.pop(data.draw(st.integers(0, len(self.reqs) - 1)))
        if store:
            self.insert(req, len(req.key))
            self.alloc.free(req.pages[len(req.key) // self.ps :])
        else:  # aborted: nothing goes to the cache
            self.alloc.free(req.pages[req.num_tree_pages :])
        self.cache.unlock(req.node)

    @precondition(lambda self: self.reqs)
    @rule(data=st.data())
    def cache_prefix_and_relock(self, data):
        """Mid-request insert of a computed prefix, then pin the cached copy (chunked prefill)."""
        req = self.reqs[data.draw(st.integers(0, len(self.reqs) - 1))]
        num_tokens = data.draw(st.integers(req.num_tree_pages * self.ps, len(req.key)))
        full = num_tokens // self.ps
        self.insert(req, num_tokens)
        self.cache.unlock(req.node)
        m = self.match(req.key[: full * self.ps])
        self.cache.lock(m.node)
        assert len(m.pages) == full
        req.pages = m.pages + req.pages[full:]
        req.node, req.num_tree_pages = m.node, full

    @rule(data=st.data())
    def match_only(self, data):
        key = data.draw(keys)
        if self.history and data.draw(st.booleans()):
            base = data.draw(st.sampled_from(self.history))
            key = base[: data.draw(st.integers(0, len(base)))] + key[:2]
        self.match(key)

    @rule(n=st.integers(-1, 12))
    def evict_pages(self, n):
        self.evict(n)

    @rule()
    def reset(self):
        self.cache.reset()
        self.model = tree_map(self.cache)
        assert self.cache.num_cached_pages == self.cache.num_locked_pages

    @invariant()
    def pages_owned_exactly_once(self):
        self.cache.check_invariants()
        free = self.alloc.free_pages()
        tree = self.cache.owned_pages()
        held = [p for r in self.reqs for p in r.pages[r.num_tree_pages :]]
        everything = free + tree + held
        assert len(everything) == len(set(everything)) == self.alloc.num_total
        assert set(everything) == set(range(1, self.alloc.num_total + 1))
        assert tree_map(self.cache) == self.model
        locked = {p for r in self.reqs for p in r.pages[: r.num_tree_pages]}
        assert locked <= set(tree)
        assert self.cache.num_locked_pages == len(locked)

    def teardown(self):
        # Everything finished and flushed: every page is back in the allocator.
        if not hasattr(self, "cache"):
            return
        for req in self.reqs:
            self.alloc.free(req.pages[req.num_tree_pages :])
            self.cache.unlock(req.node)
        self.reqs.clear()
        self.cache.reset()
        self.cache.check_invariants()
        assert self.cache.num_cached_pages == 0
        assert self.alloc.num_free == self.alloc.num_total


TestCacheMachine = CacheMachine.TestCase
TestCacheMachine.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
