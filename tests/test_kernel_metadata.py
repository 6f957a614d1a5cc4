"""Host-side metadata of the GPU backends and the CUDA graph runner (runs on CPU)."""

from __future__ import annotations

import pytest

from scheduler_proc.cuda_graph import graph_batch_sizes


def test_graph_batch_sizes():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(6) == [1, 2, 4, 6]
    assert graph_batch_sizes(8) == [1, 2, 4, 8]
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    sizes = graph_batch_sizes(256)
    assert sizes[:5] == [1, 2, 4, 8, 16] and sizes[-1] == 256
    assert all(b - a == 8 for a, b in zip(sizes[3:], sizes[4:]))
    with pytest.raises(ValueError):
        graph_batch_sizes(0)


def test_flashinfer_host_layout():
    pytest.importorskip("triton")
    from kernels.flashinfer_backend import _host_layout

    qo, kv, last = _host_layout([3, 1, 16], [3, 17, 32], page_size=16)
    assert qo.tolist() == [0, 3, 4, 20]
    assert kv.tolist() == [0, 1, 3, 5]
    assert last.tolist() == [3, 1, 16]
    qo, kv, last = _host_layout([1, 1], [5, 1], page_size=1)
    assert kv.tolist() == [0, 5, 6] and last.tolist() == [1, 1]


def test_split_mixed_batches():
    from kernels.mixed_split import split_mixed

    assert split_mixed([1, 1], [5, 9], 4) is None  # pure decode
    assert split_mixed([3, 7], [3, 9], 4) is None  # pure extend
    # seqs: 0 decode (len 5: 2 pages), 1 extend 3 new of 9 (3 pages), 2 decode (len 1), 3 extend 2 of 8
    dec, ext = split_mixed([1, 3, 1, 2], [5, 9, 1, 8], 4)
    assert dec.seq_ids.tolist() == [0, 2] and ext.seq_ids.tolist() == [1, 3]
    assert dec.rows.tolist() == [0, 4] and ext.rows.tolist() == [1, 2, 3, 5, 6]
    assert dec.qo_indptr.tolist() == [0, 1, 2] and ext.qo_indptr.tolist() == [0, 3, 5]
    # full kv_indptr is [0, 2, 5, 6, 8]
    assert dec.page_idx.tolist() == [0, 1, 5] and dec.kv_indptr.tolist() == [0, 2, 3]
    assert ext.page_idx.tolist() == [2, 3, 4, 6, 7] and ext.kv_indptr.tolist() == [0, 3, 5]
    assert dec.last_page_len.tolist() == [1, 1] and ext.last_page_len.tolist() == [1, 4]
    assert dec.seq_lens == [5, 1] and ext.q_lens == [3, 2]
    assert dec.row_range is None and ext.row_range is None  # interleaved: rows are gathered
    # the scheduler's order (decodes first): each part is one contiguous range of rows
    dec, ext = split_mixed([1, 1, 3, 2], [5, 1, 9, 8], 4)
    assert (dec.row_range, ext.row_range) == ((0, 2), (2, 7))
    assert dec.rows.tolist() == [0, 1] and ext.rows.tolist() == [2, 3, 4, 5, 6]
