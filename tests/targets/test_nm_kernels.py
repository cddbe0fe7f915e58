"""The two TVM kernels of an N:M (2:4) compressed linear -- decode (expand per column
tile, dense matmul) and sparse (kept weights only, input gathered) -- compute what the
torch op computes, for every storage variant, at decode and prefill row counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import te, tirx
from tvm.ir import IRModule

from edgec.packing import PackedLinear, compress_nm, quantize
from edgec.targets.tvm_packed import NM_KERNELS
from edgec.targets.tvm_schedule import CpuScheduleConfig, schedule_prim_func

pytestmark = pytest.mark.compile


def _two_of_four(rows: int, cols: int) -> torch.Tensor:
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(4))
    blocks = weight.reshape(rows, cols // 4, 4)
    keep = torch.zeros_like(blocks, dtype=torch.bool).scatter_(-1, blocks.abs().topk(2, dim=-1).indices, True)
    return (blocks * keep).reshape(rows, cols)


@pytest.mark.parametrize("kernel", sorted(NM_KERNELS))
@pytest.mark.parametrize(("bits", "symmetric", "with_bias"), [(4, True, False), (4, False, True), (3, False, False), (8, True, True)])
def test_both_kernels_match_the_torch_op(kernel: str, bits: int, symmetric: bool, with_bias: bool) -> None:
    outputs, inputs = 48, 64
    packed = compress_nm(quantize(_two_of_four(outputs, inputs), bits, 16, symmetric), 2, 4)
    assert packed is not None
    bias = torch.randn(outputs) if with_bias else None
    stored = [*packed.planes, packed.index, packed.scales, packed.zeros]
    planes = [te.placeholder(tuple(t.T.shape), str(t.dtype).removeprefix("torch."), f"p{i}") for i, t in enumerate(stored) if t is not None]
    rows = tirx.Var("rows", "int64")
    x = te.placeholder((1, rows, inputs), "float32", "x")
    bias_in = te.placeholder((outputs,), "float32", "bias") if with_bias else None
    plane0, plane1 = planes[0], planes[1] if len(packed.planes) == 2 else None
    rest = planes[len(packed.planes):]
    index, scales, zeros = rest[0], rest[1], rest[2] if packed.zeros is not None else None
    out = NM_KERNELS[kernel](x, plane0, plane1, index, scales, zeros, bias_in, bits, 16, 2, 4)
    func = te.create_prim_func([x, *planes, *([bias_in] if bias_in is not None else []), out])
    target = tvm.target.Target({"kind": "llvm"})
    scheduled, rule = schedule_prim_func(func, CpuScheduleConfig.from_target(target))
    assert rule == ("sparse-matmul" if kernel == "sparse" else "matmul+pad+panel")
    library = tvm.compile(IRModule({"main": scheduled.with_attr("global_symbol", "main")}), target)
    device = tvm.cpu()
    for count in (1, 8):
        values = torch.randn(1, count, inputs, generator=torch.Generator().manual_seed(count))
        want = PackedLinear(packed, bias)(values).numpy()
        args = [values.numpy()] + [t.T.contiguous().numpy() for t in stored if t is not None] + ([bias.numpy()] if bias is not None else [])
        got = tvm.runtime.tensor(np.zeros((1, count, outputs), "float32"), device)
        library["main"](*[tvm.runtime.tensor(a, device) for a in args], got)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)
