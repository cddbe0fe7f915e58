"""The GCN aggregation A_hat H as a TVM kernel of our own: a CSR segment sum.

TVM's PyTorch frontend cannot lower `index_add` on a 2-D tensor (it becomes `index_put`
with one index tensor, which relax refuses), and a scatter with atomics would serialise on
CPUs. Sorted by target row, the aggregation is a segment sum with no write conflict:

    out[i, :] = sum over j in indptr[i] .. indptr[i+1] of weight[j] * x[source[j], :]

The kernel is parallel over rows; each row accumulates in a local buffer of the row's width,
vectorised across columns (16 / 8 / 4 lanes where the width allows), and is written once.
Nodes, edges and source rows are symbolic (one build serves any graph); the width is fixed
per build, as each GCN layer's is. Edges keep their order within a row, so the sums run in
the order of an index_add over the same sorted edges.
"""

from __future__ import annotations

from typing import Any

import numpy as np

FUNCTION = "segment_sum"


def lanes_for(width: int) -> int:
    return next((lanes for lanes in (16, 8, 4) if width % lanes == 0), 1)


def segment_sum_module(width: int) -> Any:
    """IRModule with `segment_sum(indptr, source, weight, x, out)` for rows of `width`."""
    import tvm
    from tvm.script import tirx as T

    lanes = lanes_for(width)
    blocks = width // lanes

    @T.prim_func(private=False)
    def segment_sum(indptr_h: T.handle, source_h: T.handle, weight_h: T.handle, x_h: T.handle, out_h: T.handle) -> None:
        T.func_attr({"global_symbol": FUNCTION, "tir.noalias": True})
        rows = T.int64()
        edges = T.int64()
        sources = T.int64()
        indptr = T.match_buffer(indptr_h, (rows + 1,), "int64")
        source = T.match_buffer(source_h, (edges,), "int64")
        weight = T.match_buffer(weight_h, (edges,), "float32")
        x = T.match_buffer(x_h, (sources, width), "float32")
        out = T.match_buffer(out_h, (rows, width), "float32")
        for i in T.parallel(rows):
            acc = T.alloc_buffer((width,), "float32", scope="local")
            for k0 in T.serial(blocks):
                for k1 in T.vectorized(lanes):
                    acc[k0 * lanes + k1] = T.float32(0)
            for j in T.serial(indptr[i + 1] - indptr[i]):
                for k0 in T.serial(blocks):
                    for k1 in T.vectorized(lanes):
                        acc[k0 * lanes + k1] = acc[k0 * lanes + k1] + weight[indptr[i] + j] * x[source[indptr[i] + j], k0 * lanes + k1]
            for k0 in T.serial(blocks):
                for k1 in T.vectorized(lanes):
                    out[i, k0 * lanes + k1] = acc[k0 * lanes + k1]

    return tvm.IRModule({FUNCTION: segment_sum})


def build_segment_sum(width: int, target: dict[str, Any] | str) -> Any:
    """The compiled kernel (a runtime module whose `segment_sum` is called in place)."""
    import tvm

    return tvm.compile(segment_sum_module(width), target=tvm.target.Target(target))


def csr_by_target(source: np.ndarray, target: np.ndarray, weight: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indptr, source, weight) with edges grouped by target row, in their order within a row."""
    order = np.argsort(target, kind="stable")
    indptr = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(target, minlength=rows), out=indptr[1:])
    return indptr, source[order].astype(np.int64), weight[order].astype(np.float32)
