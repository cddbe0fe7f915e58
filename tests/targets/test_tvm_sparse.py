"""The GCN aggregation kernel of our own (a CSR segment sum in TVM) computes what the
exported index_add form computes, for any graph size with one build, at widths that take
16, 8, 4 or no vector lanes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgec.gcn.model import aggregate, normalized_edges
from edgec.targets.tvm_sparse import FUNCTION, build_segment_sum, csr_by_target, lanes_for
from tests.conftest import parallel_bodies

pytestmark = pytest.mark.compile


@pytest.mark.parametrize("width", [64, 24, 12, 26])
def test_segment_sum_equals_the_index_add_aggregation_on_graphs_of_any_size(width: int) -> None:
    import tvm

    kernel = build_segment_sum(width, {"kind": "llvm"})[FUNCTION]
    rng = np.random.default_rng(width)
    for nodes, edges in ((7, 0), (300, 2_000), (1_000, 9_000)):  # one build, symbolic sizes; a graph without edges
        edge_index = rng.integers(0, nodes, (2, edges))
        source, target, weight = normalized_edges(edge_index, nodes, True)
        x = rng.standard_normal((nodes, width)).astype(np.float32)
        indptr, by_row, weights = csr_by_target(source, target, weight, nodes)
        out = tvm.runtime.tensor(np.zeros((nodes, width), np.float32))
        kernel(*(tvm.runtime.tensor(a) for a in (indptr, by_row, weights, x, np.zeros(width, np.float32))), out)
        want = aggregate(torch.from_numpy(x), *(torch.from_numpy(a) for a in (source, target, weight))).numpy()
        np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5)
        assert np.abs(want).max() > 0.1  # not trivially zero
    assert [lanes_for(w) for w in (64, 24, 12, 26)] == [16, 8, 4, 1]
    # A row's accumulator is on the task's stack: a workspace-pool call per row was 4/5 of
    # the kernel's time on WordNet.
    tasks = parallel_bodies(build_segment_sum(width, {"kind": "llvm"}).mod.inspect_source("asm"))
    assert "mul" in tasks and "TVMBackendAllocWorkspace" not in tasks
