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
