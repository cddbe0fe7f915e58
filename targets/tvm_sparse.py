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


def segment_sum_function(width: int, relu: bool = False, name: str = FUNCTION) -> Any:
    """PrimFunc `name(indptr, source, weight, x, bias, out)` for rows of `width`: the bias is
    added and (with `relu`) negatives cut where each row is written."""
    from tvm.script import tirx as T

    lanes = lanes_for(width)
    blocks = width // lanes
    floor = 0.0 if relu else -3.4028234663852886e38  # max(v, floor): ReLU, or nothing

    @T.prim_func(private=True)
    def segment_sum(indptr_h: T.handle, source_h: T.handle, weight_h: T.handle, x_h: T.handle, bias_h: T.handle,
                    out_h: T.handle) -> None:
        T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
        rows = T.int64()
        edges = T.int64()
        sources = T.int64()
        indptr = T.match_buffer(indptr_h, (rows + 1,), "int64")
        source = T.match_buffer(source_h, (edges,), "int64")
        weight = T.match_buffer(weight_h, (edges,), "float32")
        x = T.match_buffer(x_h, (sources, width), "float32")
        bias = T.match_buffer(bias_h, (width,), "float32")
        out = T.match_buffer(out_h, (rows, width), "float32")
        for i in T.parallel(rows):
            acc = T.alloc_buffer((width,), "float32")
            for k0 in T.serial(blocks):
                for k1 in T.vectorized(lanes):
                    acc[k0 * lanes + k1] = T.float32(0)
            for j in T.serial(indptr[i + 1] - indptr[i]):
                for k0 in T.serial(blocks):
                    for k1 in T.vectorized(lanes):
                        acc[k0 * lanes + k1] = acc[k0 * lanes + k1] + weight[indptr[i] + j] * x[source[indptr[i] + j], k0 * lanes + k1]
            for k0 in T.serial(blocks):
                for k1 in T.vectorized(lanes):
                    out[i, k0 * lanes + k1] = T.max(acc[k0 * lanes + k1] + bias[k0 * lanes + k1], T.float32(floor))

    return segment_sum.with_attr("global_symbol", name)


def segment_sum_module(width: int, relu: bool = False) -> Any:
    import tvm

    return tvm.IRModule({FUNCTION: segment_sum_function(width, relu)})


def convert_map() -> dict[str, Any]:
    """The TVM importer's lowering of `edgec::segment_sum` (edgec/gcn/ops.py) to the kernel."""
    return {"segment_sum.default": _convert_segment_sum}


def _convert_segment_sum(node: Any, importer: Any) -> Any:
    from tvm import relax

    builder = importer.block_builder
    x, indptr, source, weight, bias, relu = importer.retrieve_args(node)
    width = int(node.args[0].meta["val"].shape[1])
    if bias is None:
        bias = relax.const(np.zeros(width, dtype=np.float32))
    name = f"{FUNCTION}_{width}" + ("_relu" if relu else "")
    kernel = builder.add_func(segment_sum_function(width, bool(relu), name), name)
    rows = indptr.ty.shape[0] - 1
    return builder.emit(relax.call_tir(kernel, [indptr, source, weight, x, bias], relax.TensorType([rows, width], "float32")))


def build_segment_sum(width: int, target: dict[str, Any] | str) -> Any:
    """The compiled kernel alone (a runtime module whose `segment_sum` is called in place, with
    a bias argument: zeros for none)."""
    import tvm

    return tvm.compile(segment_sum_module(width), target=tvm.target.Target(target))


def csr_by_target(source: np.ndarray, target: np.ndarray, weight: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indptr, source, weight) with edges grouped by target row, in their order within a row."""
    order = np.argsort(target, kind="stable")
    indptr = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(target, minlength=rows), out=indptr[1:])
    return indptr, source[order].astype(np.int64), weight[order].astype(np.float32)
