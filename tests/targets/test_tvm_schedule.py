"""Rule-based CPU schedules: a tiny Linear / SiLU / RMSNorm / attention block with a
dynamic sequence length compiles with cpu_pipeline, matches torch at two lengths,
and every kernel carries the loop structure its rule promises (x86 host and an
aarch64 build); its Linear weights stored as panels of the target's tile width
still match, and every matmul tile accumulates in registers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
import tvm_ffi
from tvm import relax, s_tir
from tvm.support import cc
from tvm.relax.frontend.torch import from_exported_program
from tvm.script import tirx as T

from edgec.targets import tvm_schedule as ts
from edgec.targets.backend_tvm import _transform_params_once
from edgec.targets.tvm_layout import panel_width, use_panel_weights

AARCH64 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
# Not multiples of the 8-row register tile nor of a 16-lane vector: tails are exercised.
SEQ_LENS = (7, 37)


class TinyBlock(torch.nn.Module):
    """RMSNorm -> QKV Linear -> softmax(QK^T) V -> Linear, then a SiLU-gated MLP."""

    def __init__(self, dim: int = 64, heads: int = 4, hidden: int = 96) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.norm = torch.nn.Parameter(torch.rand(dim) + 0.5)
        self.qkv = torch.nn.Linear(dim, 3 * dim, bias=False)
        self.out = torch.nn.Linear(dim, dim, bias=False)
        self.gate = torch.nn.Linear(dim, hidden, bias=False)
        self.up = torch.nn.Linear(dim, hidden)
        self.down = torch.nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x.shape
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.norm
        q, k, v = (
            t.reshape(batch, seq, self.heads, self.head_dim).transpose(1, 2)
            for t in self.qkv(h).split(dim, dim=-1)
        )
        scores = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.head_dim), dim=-1)
        x = x + self.out((scores @ v).transpose(1, 2).reshape(batch, seq, dim))
        return x + self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))


@pytest.fixture(scope="module")
def model() -> TinyBlock:
    torch.manual_seed(0)
    return TinyBlock().eval()


@pytest.fixture(scope="module")
def relax_module(model: TinyBlock) -> tuple[tvm.IRModule, list[np.ndarray]]:
    example = torch.randn(1, 11, 64)
    program = torch.export.export(model, (example,), dynamic_shapes={"x": {1: torch.export.Dim.DYNAMIC}})
    mod = from_exported_program(program, keep_params_as_input=True)
    mod, params = relax.frontend.detach_params(mod)
    return mod, [p.numpy() for p in params["main"]]


@pytest.fixture(scope="module")
def host_target() -> tvm.target.Target:
    mcpu = tvm.target.Target.from_device(tvm.cpu()).attrs["mcpu"]
    return tvm.target.Target({"kind": "llvm", "mcpu": str(mcpu)})


def test_outputs_match_torch_at_two_sequence_lengths(
    model: TinyBlock, relax_module: tuple[tvm.IRModule, list[np.ndarray]], host_target: tvm.target.Target
) -> None:
    mod, params = relax_module
    executable = tvm.compile(mod, host_target, relax_pipeline=ts.cpu_pipeline(host_target))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    weights = [tvm.runtime.tensor(p) for p in params]
    for seq in SEQ_LENS:
        x = torch.randn(1, seq, 64)
        with torch.no_grad():
            expected = model(x).numpy()
        got = vm["main"](tvm.runtime.tensor(x.numpy()), *weights)[0].numpy()
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_every_kernel_gets_the_loop_structure_of_its_rule(
    relax_module: tuple[tvm.IRModule, list[np.ndarray]], host_target: tvm.target.Target
) -> None:
    scheduled = ts.scheduled_module(relax_module[0], host_target)
    report = ts.schedule_report(scheduled)
    assert report and all(rule not in ("none", "unscheduled") for rule in report.values()), report

    matmuls = {name: rule for name, rule in report.items() if "matmul" in name}
    # Four projections + gate/up/down and the two attention matmuls (QK^T, PV).
    assert len(matmuls) >= 6 and all(rule.startswith("matmul") for rule in matmuls.values()), matmuls
    assert any("sigmoid" in name and rule == "injective" for name, rule in report.items()), report
    assert sum(rule.startswith("reduction") for rule in report.values()) == 2, report  # RMSNorm, softmax

    for name, rule in report.items():
        kinds = ts.loop_kinds(scheduled[name])
        assert "parallel" in kinds, (name, rule, kinds)
        if rule.startswith("matmul") or rule in ("injective", "reduction+rfactor"):
            assert "vectorized" in kinds, (name, rule, kinds)
        if rule.startswith("matmul"):
            assert "unrolled" in kinds, (name, rule, kinds)


def test_aarch64_build(relax_module: tuple[tvm.IRModule, list[np.ndarray]], tmp_path: Path) -> None:
    target = tvm.target.Target(AARCH64)
    assert ts.CpuScheduleConfig.from_target(target).lanes("float32") == 4
    report = ts.schedule_report(ts.scheduled_module(relax_module[0], target))
    assert sum(rule.startswith("matmul") for rule in report.values()) >= 6, report
    executable = tvm.compile(relax_module[0], target, relax_pipeline=ts.cpu_pipeline(target))
    library = tmp_path / "block.so"
    executable.export_library(str(library), fcompile=cc.cross_compiler("aarch64-linux-gnu-g++"))
    header = library.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64


@T.prim_func(s_tir=True)
def _prefix_sum(a: T.Buffer((T.int64(8), T.int64(100)), "float32"), out: T.Buffer((T.int64(8), T.int64(100)), "float32")):
    for i in range(T.int64(8)):
        with T.sblock("first"):
            vi = T.axis.spatial(T.int64(8), i)
            out[vi, 0] = a[vi, 0]
        for j in range(T.int64(1), T.int64(100)):
            with T.sblock("scan"):
                vi, vj = T.axis.remap("SS", [i, j])
                T.reads(out[vi, vj - 1], a[vi, vj])
                T.writes(out[vi, vj])
                out[vi, vj] = out[vi, vj - 1] + a[vi, vj]


def test_a_kernel_no_rule_fits_is_left_as_is_and_still_builds() -> None:
    config = ts.CpuScheduleConfig(vector_bits=512)
    func, rule = ts.schedule_prim_func(_prefix_sum, config)
    assert rule == "none" and func.attrs[ts.RULE_ATTR] == "none"
    executable = tvm.compile(tvm.IRModule({"main": func}), tvm.target.Target({"kind": "llvm"}))
    a = np.random.rand(8, 100).astype("float32")
    out = tvm.runtime.tensor(np.zeros_like(a))
    executable.jit()["main"](tvm.runtime.tensor(a), out)
    np.testing.assert_allclose(out.numpy(), np.cumsum(a, axis=1), rtol=1e-5)


def test_prescheduled_functions_are_left_alone(host_target: tvm.target.Target) -> None:
    done = _prefix_sum.with_attr("tirx.is_scheduled", True)
    mod = ts.schedule_cpu_funcs(host_target)(tvm.IRModule({"scan": done}))
    assert ts.schedule_report(mod) == {"scan": "prescheduled"}
    assert ts.loop_kinds(mod["scan"]) == {"serial"}


def test_linear_weights_become_panels_of_the_tile_width_and_still_match_torch(
    model: TinyBlock, relax_module: tuple[tvm.IRModule, list[np.ndarray]], host_target: tvm.target.Target
) -> None:
    mod, params = relax_module
    width = panel_width(host_target)
    config = ts.CpuScheduleConfig.from_target(host_target)
    assert width == config.tile_vectors * config.lanes("float32")
    panelled, rewritten = use_panel_weights(mod, 1, width)
    assert rewritten == 5  # qkv, out, gate, up, down
    # The layout transform reads only weights: lifted, it runs once, at compile time.
    lifted, values, layout = _transform_params_once(panelled, [tvm.runtime.tensor(p) for p in params], 1)
    assert layout == "pre-transformed at compile time"
    linear = {tuple(p.shape) for p in params if p.ndim == 2}
    stored = {tuple(v.numpy().shape) for v in values}
    assert {(n // width, k, width) for n, k in linear} <= stored and not linear & stored, (linear, stored)

    report = ts.schedule_report(ts.scheduled_module(lifted, host_target))
    panels = {name: rule for name, rule in report.items() if name.startswith("panel_matmul")}
    # Symbolic rows are padded to whole tiles (no tail predicate in the k loop).
    assert len(panels) >= 3 and all(rule == "matmul+pad" for rule in panels.values()), report

    vm = relax.VirtualMachine(tvm.compile(lifted, host_target, relax_pipeline=ts.cpu_pipeline(host_target)), tvm.cpu())
    for seq in SEQ_LENS:
        x = torch.randn(1, seq, 64)
        with torch.no_grad():
            expected = model(x).numpy()
        got = vm["main"](tvm.runtime.tensor(x.numpy()), *values)[0].numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("target", "width"), [(AARCH64, 8), ({"kind": "llvm", "mcpu": "x86-64-v3"}, 16),
                                               ({"kind": "llvm", "mcpu": "skylake-avx512"}, 32)])
def test_panel_width_is_one_register_tile_of_the_target(target: dict[str, object], width: int) -> None:
    assert panel_width(tvm.target.Target(target)) == width


@pytest.mark.parametrize("target", ["host", "aarch64"])
def test_matmul_accumulators_are_stack_arrays_llvm_can_keep_in_registers(
    relax_module: tuple[tvm.IRModule, list[np.ndarray]], host_target: tvm.target.Target, target: str
) -> None:
    """TVM puts a constant-size buffer in a stack array only if it is "global" and under 1 KiB;
    any other goes to its heap workspace, where LLVM stores every FMA's result back to memory
    (a 3x slower matmul with symbolic rows). Every tile's accumulator must qualify."""
    tvm_target = host_target if target == "host" else tvm.target.Target(AARCH64)
    scheduled = ts.scheduled_module(relax_module[0], tvm_target)
    matmuls = tvm.IRModule({gv: f for gv, f in scheduled.functions_items()
                            if isinstance(f, tvm.tirx.PrimFunc) and str(f.attrs[ts.RULE_ATTR]).startswith("matmul")})
    lowering = tvm.transform.Sequential([
        s_tir.transform.LowerInitBlock(), s_tir.transform.PlanAndUpdateBufferAllocationLocation(),
        s_tir.transform.ConvertBlocksToOpaque(), s_tir.transform.CompactBufferAllocation(),
    ])
    accumulators = []

    def _block(block: s_tir.SBlock) -> None:
        for buffer in block.alloc_buffers:
            if all(isinstance(d, tvm.tirx.IntImm) for d in buffer.shape):  # the padded inputs are symbolic
                accumulators.append((buffer.scope(), math.prod(int(d) for d in buffer.shape) * buffer.dtype.bits // 8))

    for _, func in lowering(matmuls).functions_items():
        tvm_ffi.structural_walk(func.body, ((s_tir.SBlock, _block),))
    assert len(accumulators) >= len(matmuls.functions_items()) >= 6
    assert all(scope == "global" and size < 1024 for scope, size in accumulators), accumulators


def test_scores_over_a_symbolic_context_keep_that_axis_serial_inside_the_parallel_heads(
    host_target: tvm.target.Target,
) -> None:
    """Q @ K^T of a decode step, K position-major: the reduction rule parallelizes the
    batch and heads and leaves the symbolic context a serial loop inside (fused into
    the parallel loop, every score divided by the context length to find its indices);
    the scores still match numpy."""
    from tvm import te, tirx

    batch, context = tirx.Var("batch", "int64"), tirx.Var("context", "int64")
    q = te.placeholder((batch, 4, 64), name="q")
    k = te.placeholder((context, batch, 4, 64), name="k")
    d = te.reduce_axis((0, 64), name="d")
    scores = te.compute((batch, 4, context), lambda b, h, t: te.sum(q[b, h, d] * k[t, b, h, d], axis=d), name="scores")
    func, rule = ts.schedule_prim_func(te.create_prim_func([q, k, scores]), ts.CpuScheduleConfig.from_target(host_target))
    assert rule.startswith("reduction"), rule
    loops: list[tirx.For] = []
    tvm_ffi.structural_walk(func.body, ((tirx.For, loops.append),))
    parallel = [loop for loop in loops if loop.kind == tirx.ForKind.PARALLEL]
    names = lambda expr: {v.name for v in _vars(expr)}  # noqa: E731
    assert len(parallel) == 1 and "context" not in names(parallel[0].extent), parallel[0].extent
    assert any(loop.kind == tirx.ForKind.SERIAL and names(loop.extent) == {"context"} for loop in loops)

    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), host_target)
    rng = np.random.default_rng(0)
    q_np, k_np = rng.standard_normal((1, 4, 64), dtype=np.float32), rng.standard_normal((37, 1, 4, 64), dtype=np.float32)
    out = tvm.runtime.tensor(np.zeros((1, 4, 37), np.float32))
    lib["main"](tvm.runtime.tensor(q_np), tvm.runtime.tensor(k_np), out)
    np.testing.assert_allclose(out.numpy(), np.einsum("bhd,tbhd->bht", q_np, k_np), rtol=1e-5, atol=1e-5)


def _vars(expr: tvm.ir.PrimExpr) -> list[tvm.tirx.Var]:
    found: list[tvm.tirx.Var] = []
    tvm_ffi.structural_walk(expr, ((tvm.tirx.Var, found.append),))
    return found
