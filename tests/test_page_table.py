"""The device page table mirrors each request's page list and gathers a step's flat page list."""

import pytest
import torch

from scheduler_proc.page_table import PageTable, gather_kv_indices_torch
from scheduler_proc.request import Req
from server.ipc import SamplingParams


def make_req(rid: str, pages: list[int]) -> Req:
    req = Req(rid=rid, input_ids=[1, 2, 3], params=SamplingParams(), arrival=0, max_new_tokens=4)
    req.set_pages(list(pages))
    return req


def rows(table: PageTable, reqs: list[Req], lens: list[int]) -> list[list[int]]:
    return [table.table[r.table_slot, :n].tolist() for r, n in zip(reqs, lens)]


def test_sync_uploads_missing_entries_and_set_pages_invalidates():
    table = PageTable(num_rows=4, max_pages=8, device=torch.device("cpu"))
    a, b = make_req("a", [5, 6, 7]), make_req("b", [9])
    table.sync([a, b], [3, 1])
    assert rows(table, [a, b], [3, 1]) == [[5, 6, 7], [9]]
    assert (a.table_len, b.table_len) == (3, 1)

    a.pages.append(11)  # a decode's new page: only it is uploaded
    table.table[a.table_slot, :3] = -1  # were the old entries re-sent, this would be overwritten
    table.sync([a], [4])
    assert table.table[a.table_slot, :4].tolist() == [-1, -1, -1, 11]

    a.set_pages([20, 21, 22, 23])  # e.g. prefix caching swapped in the tree's pages
    table.sync([a], [4])
    assert rows(table, [a], [4]) == [[20, 21, 22, 23]]

    slots = torch.tensor([b.table_slot, a.table_slot], dtype=torch.int32)
    indptr = torch.tensor([0, 1, 5], dtype=torch.int32)
    assert table.kv_indices(slots, indptr, 5).tolist() == [9, 20, 21, 22, 23]
    assert gather_kv_indices_torch(table.table, slots, indptr, 5).tolist() == [9, 20, 21, 22, 23]


def test_rows_are_released_and_reclaimed_from_requests_without_pages():
    table = PageTable(num_rows=2, max_pages=4, device=torch.device("cpu"))
    a, b = make_req("a", [1]), make_req("b", [2])
    table.sync([a, b], [1, 1])
    c = make_req("c", [3])
    with pytest.raises(RuntimeError, match="no free row"):
        table.sync([c], [1])
    b.set_pages([])  # b was retracted: its row can be reclaimed
    table.sync([c], [1])
    assert b.table_slot == -1 and rows(table, [c], [1]) == [[3]]
    table.release(a)
    assert a.table_slot == -1
    d = make_req("d", [4, 5])
    table.sync([d], [2])
    assert rows(table, [c, d], [1, 2]) == [[3], [4, 5]]
    with pytest.raises(ValueError, match="needs 5 pages"):
        d.pages += [6, 7, 8]
        table.sync([d], [5])
