"""`edgec::segment_sum`: the GCN aggregation over edges sorted by target row (CSR), with the
layer's bias and ReLU fused in, as one op that an exported program keeps whole. Its torch
body is the reference; the TVM backend lowers it to the segment-sum kernel of
targets/tvm_sparse.py (the sparse part of a compiled GCN); the ONNX backend exports the
index_add form instead (see edgec/families/gcn.py)."""

from __future__ import annotations

import torch


@torch.library.custom_op("edgec::segment_sum", mutates_args=())
def segment_sum(x: torch.Tensor, indptr: torch.Tensor, source: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                relu: bool) -> torch.Tensor:
    """out[i] = act(sum over j in indptr[i] .. indptr[i+1] of weight[j] x[source[j]] + bias)."""
    rows = indptr.shape[0] - 1
    target = torch.repeat_interleave(torch.arange(rows, dtype=torch.int64), indptr.diff())
    out = x.new_zeros(rows, x.shape[1]).index_add(0, target, x.index_select(0, source) * weight.unsqueeze(1))
    if bias is not None:
        out = out + bias
    return torch.relu(out) if relu else out


@segment_sum.register_fake
def _segment_sum_shape(x, indptr, source, weight, bias, relu):  # type: ignore[no-untyped-def]
    return x.new_empty((indptr.shape[0] - 1, x.shape[1]))
