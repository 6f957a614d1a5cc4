"""Radix-tree prefix cache: token-id prefixes -> the KV pages that hold them.

The tree is path-compressed: every non-root node owns a run of tokens (a whole number of pages)
and exactly the pages for them. Children are keyed by their first page of tokens (by the first
token when page_size == 1), so one dict lookup picks the only child that can match.

Requests pin what they use with `lock`, which counts references along the path to the root;
only subtrees with a zero count are evictable. LRU order uses a monotonic operation counter, not
the wall clock, so the same call sequence always evicts the same pages.
"""

from __future__ import annotations

import heapq
from typing import Any, Sequence

from .base import BasePageAllocator, BasePrefixCache, CacheHandle, CacheInvariantError, MatchResult


class StaleHandleError(ValueError):
    """A lock/unlock handle no longer describes pages the cache holds.

    Raised when the matched pages were evicted between match_prefix() and lock(), or when a
    handle is unlocked more times than it was locked.
    """


class _Node:
    __slots__ = ("key", "pages", "children", "parent", "ref", "last_access", "uid")

    def __init__(self, key: list[int], pages: list[int], parent: _Node | None, last_access: int,
                 uid: int) -> None:
        self.key = key  # len(key) == len(pages) * page_size
        self.pages = pages
        self.children: dict[Any, _Node] = {}
        self.parent = parent  # None for the root and for nodes no longer in the tree
        self.ref = 0  # locks held on this node or any descendant
        self.last_access = last_access
        self.uid = uid  # creation order: a deterministic LRU tie-break


class _TreeHandle(CacheHandle):
    """RadixCache's handle: the matched node and the prefix length it stood for.

    The length lets lock() notice a handle whose pages were evicted after the match.
    """

    __slots__ = ("node", "num_tokens")

    def __init__(self, node: _Node, num_tokens: int) -> None:
        self.node, self.num_tokens = node, num_tokens


def _token_list(seq: Sequence[int]) -> list[int]:
    # Tensors / numpy arrays iterate as 0-d scalars that hash and compare badly as dict keys.
    if isinstance(seq, list):
        return seq
    tolist = getattr(seq, "tolist", None)
    return tolist() if tolist is not None else list(seq)


def _common_prefix_len(node_key: list[int], key: list[int], start: int, end: int) -> int:
    """Length of the common prefix of node_key and key[start:end]."""
    n = min(len(node_key), end - start)
    # Whole-node hits are the common case; one C-level slice compare settles them.
    if n == len(node_key) and key[start:start + n] == node_key:
        return n
    for j in range(n):
        if node_key[j] != key[start + j]:
            return j
    return n


class RadixCache(BasePrefixCache):
    """Prefix cache over token ids with page-granular matching (see base.BasePrefixCache).

    - `match_prefix(key, count=False) -> MatchResult`: longest cached page-aligned prefix of key.
      Splits a node when the match ends inside it, so the returned handle pins exactly the
      matched pages. Refreshes the LRU time of the matched path. The caller that needs logits
      for the last prompt token should match `prompt[:-1]`.
    - `lock(handle)` / `unlock(handle)`: handle is `MatchResult.node`; lock right after the match
      (before anything can evict). Locking the empty match is a no-op.
    - `insert(key, pages) -> int`: see the base contract. Only the page-aligned part of key is
      used. To keep pages pinned after inserting, match the key again and lock that handle.
    - `evict(n) -> int`: frees exactly min(n, num_evictable_pages) pages, taking them from the
      tail of the least recently used unlocked leaf first (a leaf is trimmed, not dropped
      whole, when it has more pages than still needed); a parent left without children
      becomes a leaf candidate in turn.
    - `reset()`: evicts everything unlocked. Hit/miss counters are cumulative and survive it.
    """

    def __init__(self, allocator: BasePageAllocator, page_size: int = 1) -> None:
        super().__init__(allocator, page_size)
        self._clock = 0  # bumped once per match/insert; the LRU time of touched nodes
        self._next_uid = 1
        self._root = _Node([], [], None, 0, 0)
        self._leaves: set[_Node] = set()  # non-root nodes without children
        self._num_cached = 0
        self._num_locked = 0

    # ------------------------------------------------------------------ queries

    @property
    def num_cached_pages(self) -> int:
        return self._num_cached

    @property
    def num_locked_pages(self) -> int:
        """Pages on some locked path (never evicted until unlocked)."""
        return self._num_locked

    @property
    def num_nodes(self) -> int:
        """Nodes in the tree, the root excluded."""
        count, stack = 0, [self._root]
        while stack:
            node = stack.pop()
            count += len(node.children)
            stack.extend(node.children.values())
        return count

    def owned_pages(self) -> list[int]:
        """Every page the tree owns (for leak checks; O(cached pages))."""
        out: list[int] = []
        stack = [self._root]
        while stack:
            node = stack.pop()
            out.extend(node.pages)
            stack.extend(node.children.values())
        return out

    # ------------------------------------------------------------------ contract

    def match_prefix(self, key: Sequence[int], count: bool = False) -> MatchResult:
        key = _token_list(key)
        node, matched, pages = self._walk(key, collect_pages=True)
        if count:
            self.hit_tokens += matched
            self.miss_tokens += len(key) - matched
        return MatchResult(pages, matched, _TreeHandle(node, matched))

    def insert(self, key: Sequence[int], pages: Sequence[int]) -> int:
        key = _token_list(key)
        ps = self.page_size
        num_pages = len(key) // ps
        if len(pages) != num_pages:
            raise ValueError(f"insert needs len(key) // page_size = {num_pages} pages, got {len(pages)}")
        end = num_pages * ps
        if end != len(key):
            key = key[:end]
        node, matched, _ = self._walk(key, collect_pages=False)
        if matched < end:
            new_pages = [int(p) for p in _token_list(pages[matched // ps:])]
            if min(new_pages) <= 0:
                raise ValueError("page 0 is reserved and never holds cached KV")
            self._add_child(node, _Node(key[matched:], new_pages, node, self._clock, self._uid()))
        return matched

    def lock(self, node: CacheHandle) -> None:
        target = self._check_handle(node)
        while target is not self._root:
            if target.ref == 0:
                self._num_locked += len(target.pages)
            target.ref += 1
            target = target.parent

    def unlock(self, node: CacheHandle) -> None:
        target = self._check_handle(node)
        if target is not self._root and target.ref == 0:
            raise StaleHandleError("unlock of a handle that is not locked")
        # parent.ref >= child.ref, so no ancestor can drop below zero either.
        while target is not self._root:
            target.ref -= 1
            if target.ref == 0:
                self._num_locked -= len(target.pages)
            target = target.parent

    def evict(self, num_pages: int) -> int:
        if num_pages <= 0:
            return 0
        heap = [(n.last_access, n.uid, n) for n in self._leaves if n.ref == 0]
        heapq.heapify(heap)
        freed: list[int] = []
        ps = self.page_size
        while heap and len(freed) < num_pages:
            _, _, node = heap[0]
            need = num_pages - len(freed)
            if need < len(node.pages):
                # Keep the head of the sequence: it is the part other requests share.
                freed.extend(node.pages[-need:])
                del node.pages[-need:]
                del node.key[len(node.pages) * ps:]
                self._num_cached -= need
                break
            heapq.heappop(heap)
            freed.extend(node.pages)
            parent = node.parent
            self._remove_leaf(node)
            if parent is not self._root and not parent.children and parent.ref == 0:
                heapq.heappush(heap, (parent.last_access, parent.uid, parent))
        if freed:
            self.allocator.free(freed)
        return len(freed)

    def reset(self) -> None:
        self.evict(self.num_evictable_pages)

    # ------------------------------------------------------------------ debugging

    def _check_structure(self) -> None:
        """The tree's own invariants (page ownership is checked by the base class):
        parent/child links and child dict keys; every node's key is a non-empty whole number of
        pages with exactly len(key) // page_size pages; ref counts are >= 0 and a parent's >=
        its child's; LRU times never increase going down; the leaf set and the page counters
        match the tree. O(cached pages).
        """
        ps = self.page_size
        root = self._root
        if root.key or root.pages or root.parent is not None or root.ref != 0:
            raise CacheInvariantError("root must be empty, parentless and unlocked")
        leaves: set[_Node] = set()
        cached = locked = 0
        stack = [root]
        while stack:
            node = stack.pop()
            for ck, child in node.children.items():
                where = f"node uid={child.uid}"
                if child.parent is not node:
                    raise CacheInvariantError(f"{where}: parent link broken")
                if not child.key or len(child.key) % ps:
                    raise CacheInvariantError(f"{where}: key length {len(child.key)} is not a positive "
                                              f"multiple of page_size {ps}")
                if len(child.pages) != len(child.key) // ps:
                    raise CacheInvariantError(f"{where}: {len(child.pages)} pages for {len(child.key)} tokens")
                if ck != self._child_key(child.key, 0):
                    raise CacheInvariantError(f"{where}: stored under key {ck!r}, first page differs")
                if child.ref < 0:
                    raise CacheInvariantError(f"{where}: negative ref count {child.ref}")
                if node is not root and node.ref < child.ref:
                    raise CacheInvariantError(f"{where}: ref {child.ref} exceeds its parent's {node.ref}")
                if node is not root and node.last_access < child.last_access:
                    raise CacheInvariantError(f"{where}: accessed after its parent")
                cached += len(child.pages)
                if child.ref > 0:
                    locked += len(child.pages)
                if not child.children:
                    leaves.add(child)
                stack.append(child)
        if leaves != self._leaves:
            raise CacheInvariantError("leaf set out of sync with the tree")
        if cached != self._num_cached or locked != self._num_locked:
            raise CacheInvariantError(f"counters cached={self._num_cached} locked={self._num_locked}, "
                                      f"tree has cached={cached} locked={locked}")

    # ------------------------------------------------------------------ internals

    def _uid(self) -> int:
        self._next_uid += 1
        return self._next_uid

    def _child_key(self, key: list[int], start: int) -> Any:
        if self.page_size == 1:
            return key[start]
        return tuple(key[start:start + self.page_size])

    def _walk(self, key: list[int], collect_pages: bool) -> tuple[_Node, int, list[int]]:
        """Follow the longest page-aligned cached prefix of key, splitting where it ends mid-node.

        Returns (deepest matched node, matched tokens, matched pages if collect_pages).
        """
        ps = self.page_size
        end = len(key) - len(key) % ps
        self._clock += 1
        tick = self._clock
        node, pos = self._root, 0
        pages: list[int] = []
        while pos < end:
            child = node.children.get(self._child_key(key, pos))
            if child is None:
                break
            # The dict key matched a whole page, so m >= page_size here.
            m = _common_prefix_len(child.key, key, pos, end)
            m -= m % ps
            if m < len(child.key):
                child = self._split(child, m)
            child.last_access = tick
            if collect_pages:
                pages.extend(child.pages)
            node, pos = child, pos + m
        return node, pos, pages

    def _split(self, node: _Node, num_tokens: int) -> _Node:
        """Cut node after num_tokens; return the new head. node keeps the tail (and its identity,
        so handles to it still pin the same path)."""
        ps = self.page_size
        parent = node.parent
        head = _Node(node.key[:num_tokens], node.pages[:num_tokens // ps], parent, node.last_access,
                     self._uid())
        head.ref = node.ref
        parent.children[self._child_key(node.key, 0)] = head
        node.key = node.key[num_tokens:]
        node.pages = node.pages[num_tokens // ps:]
        node.parent = head
        head.children[self._child_key(node.key, 0)] = node
        return head

    def _add_child(self, parent: _Node, child: _Node) -> None:
        parent.children[self._child_key(child.key, 0)] = child
        self._leaves.discard(parent)
        self._leaves.add(child)
        self._num_cached += len(child.pages)

    def _remove_leaf(self, node: _Node) -> None:
        parent = node.parent
        del parent.children[self._child_key(node.key, 0)]
        node.parent = None
        self._leaves.discard(node)
        self._num_cached -= len(node.pages)
        if parent is not self._root and not parent.children:
            self._leaves.add(parent)

    def _check_handle(self, handle: CacheHandle) -> _Node:
        if not isinstance(handle, _TreeHandle):
            raise TypeError(f"expected a MatchResult.node handle, got {type(handle).__name__}")
        node = handle.node
        path, cur = 0, node
        while cur.parent is not None:
            path += len(cur.key)
            cur = cur.parent
        if cur is not self._root or path != handle.num_tokens:
            raise StaleHandleError("the matched pages were evicted before lock/unlock")
        return node
