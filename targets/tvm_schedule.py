"""Rule-based (tuning-free) CPU schedules for every PrimFunc of a Relax module.

Before: TVM 0.27's default ``llvm`` Relax pipeline legalizes and fuses operators
but schedules no PrimFunc, so every kernel is a serial, scalar loop nest (an LLM
prefill runs ~170x slower than ONNX Runtime; one 64x576 @ 576x1536 Linear takes
~180 ms).

After: ``cpu_pipeline(target)`` is the same pipeline with ``schedule_cpu_funcs``
inserted right after fusion (and right after dataflow reshapes became views).
Each PrimFunc gets the first rule that applies, each tried on a fresh schedule;
a ``ScheduleError`` only moves on to the next, simpler rule:

* ``matmul+pad`` / ``matmul`` / ``matmul+predicate``: C[..., i, j] += A[..., i, k]
  * B[..., k, j], with fused prologues / epilogues (bias, SiLU, multiply).
  A ``rows x (vectors * lanes)`` register tile (8 x 32 floats on AVX-512)
  accumulates in a ``local`` buffer, innermost axis vectorized, tile loops
  unrolled, the batch / column-tile / row-tile loops fused and parallel, the
  zero-init hoisted out of the k loop (``decompose_reduction``), the epilogue
  computed per tile. Symbolic rows (sequence length) or columns are padded to
  whole tiles (``+pad``): a tail predicate inside the k loop keeps the
  accumulator in memory and costs ~4x.
* ``reduction+rfactor`` / ``reduction`` (RMSNorm, softmax, mean): parallel over
  the row axes all blocks share, every block computed per row, elementwise
  blocks vectorized; ``+rfactor`` also vectorizes static-length reductions
  through ``lanes`` partial results.
* ``injective`` (elementwise, broadcast, transpose, slicing): producers inlined,
  loops fused, the outer part parallel, the inner part vectorized; transposes
  are tiled ``lanes x lanes`` so their strided reads stay in L1.
  ``injective-rows``: the innermost axis is symbolic, so only the rows are
  parallel and the inner loop is left plain for LLVM's loop vectorizer (a
  TVM-vectorized loop with a tail predicate is scalarized by TVM 0.27).
* ``parallel``: the fallback -- the outer spatial loops made parallel.
* ``none``: no rule applied; the function stays as TVM legalized it.
* ``+serial`` (suffix; ``serial`` for the fallback): a decode step's kernel over one
  token's values (``touches_few_elements`` with the batch at 1) keeps the rule's
  loops but none parallel: starting the thread pool costs more than such a kernel.

The rule applied is stored in the PrimFunc attribute ``edgec.schedule_rule``
(read back by ``schedule_report``); ``loop_kinds`` lists a PrimFunc's loop kinds.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.ir import IRModule, TensorRegion
from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
from tvm.s_tir.dlight.analysis import SBlockInfo, normalize_prim_func
from tvm.s_tir.schedule import LoopRV, SBlockRV, ScheduleError
from tvm.sym import Analyzer
from tvm.target import Target
from tvm.target.codegen import llvm_get_cpu_features, llvm_get_vector_width

from edgec.errors import was_interrupted

__all__ = [
    "PANEL_MATMUL_BLOCK",
    "RULE_ATTR",
    "CpuScheduleConfig",
    "cpu_pipeline",
    "finish_pipeline",
    "fused_module",
    "schedule_fused",
    "loop_kinds",
    "schedule_cpu_funcs",
    "schedule_prim_func",
    "schedule_report",
    "scheduled_module",
    "workload_key",
]

RULE_ATTR = "edgec.schedule_rule"
# The reduction block of a matmul over [N / width, K, width] weight panels (tvm_layout):
# a batched matmul to the rules, one panel per batch.
PANEL_MATMUL_BLOCK = "panel_matmul"
# The attribute dlight and MetaSchedule use to mark a function as done.
_SCHEDULED_ATTR = "tirx.is_scheduled"

_LOG = logging.getLogger(__name__)


class _RuleDoesNotApply(Exception):
    """The function does not have the shape a rule expects (not an error)."""


@dataclasses.dataclass(frozen=True)
class CpuScheduleConfig:
    """Target facts the rules need.

    vector_bits: width of one SIMD register (512 for AVX-512, 128 for NEON).
    tile_rows / tile_vectors: matmul register tile in rows and in SIMD vectors
    per row; 8 x 2 accumulators use 16 of the 32 registers of AVX-512 and NEON.
    """

    vector_bits: int
    tile_rows: int = 8
    tile_vectors: int = 2
    # Packed weights: decode a [K, cols] panel per column tile (True) or inline the decode.
    panel: bool = True
    # Elementwise and row-reduction kernels left serial (set per kernel by
    # schedule_prim_func for kernels that touch few elements; see SERIAL_ELEMENTS).
    serial: bool = False

    @staticmethod
    def from_target(target: Target) -> CpuScheduleConfig:
        features = {str(f) for f in llvm_get_cpu_features(target)}
        # TVM 0.27 answers the host's width for any x86 target (512 for an AVX2-only
        # x86-64-v3 build on an AVX-512 host); the target's own features do not lie.
        if "avx512f" in features:
            bits = 512
        elif "avx" in features:
            bits = 256
        elif "sse2" in features:
            bits = 128
        else:
            bits = int(llvm_get_vector_width(target))
        if bits <= 0:
            # LLVM could not tell (unknown cpu); every 64-bit CPU has 128-bit SIMD.
            bits = 128
        # x86 below AVX-512 has only 16 vector registers: halve the tile rows.
        is_aarch64 = str(target.attrs.get("mtriple", "")).startswith("aarch64")
        rows = 8 if bits >= 512 or is_aarch64 else 4
        return CpuScheduleConfig(vector_bits=bits, tile_rows=rows)

    def lanes(self, dtype: str) -> int:
        """SIMD lanes for one element type (bool counts as one byte)."""
        bits = max(tvm.DataType(dtype).bits, 8)
        return max(self.vector_bits // bits, 1)


# A rule mutates the schedule in place and returns the name to report, or raises
# ScheduleError / _RuleDoesNotApply (then the next, simpler rule is tried).
_Rule = Callable[[s_tir.Schedule, CpuScheduleConfig], str]


# --------------------------------------------------------------------------- helpers


def rule_calls(mod: IRModule, rule: str) -> list[tirx.PrimFunc]:
    """The kernel of every call in a Relax module's main to a PrimFunc marked with `rule`
    (RULE_ATTR), one per call, in the order they are visited."""
    from tvm import relax

    marked = [(gv, func) for gv, func in mod.functions_items()
              if isinstance(func, tirx.PrimFunc) and func.attrs is not None and func.attrs.get(RULE_ATTR) == rule]
    called: list[tirx.PrimFunc] = []

    def _visit(expr: relax.Expr) -> None:
        if isinstance(expr, relax.Call) and expr.args:
            called.extend(func for gv, func in marked if expr.args[0].same_as(gv))

    relax.analysis.post_order_visit(mod["main"], _visit)
    return called


def _root(sch: s_tir.Schedule) -> SBlockRV:
    return sch.get_sblock("root")


def _same(sch: s_tir.Schedule, a: SBlockRV | LoopRV, b: SBlockRV | LoopRV) -> bool:
    return bool(sch.get(a).same_as(sch.get(b)))


def _static_extent(sch: s_tir.Schedule, loop: LoopRV) -> int | None:
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def _same_extent(a: int | tirx.Expr, b: int | tirx.Expr) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return bool(tvm_ffi.structural_equal(a, b))


def _block_infos(sch: s_tir.Schedule) -> list[SBlockInfo]:
    infos = normalize_prim_func(sch)
    if infos is None:
        raise _RuleDoesNotApply("not in normal form (opaque blocks or non-trivial bindings)")
    return infos


def _output_dtype(sch: s_tir.Schedule, block: SBlockRV) -> str:
    writes = sch.get(block).writes
    return str(writes[0].source.dtype) if writes else "float32"


def _vars_in(region: TensorRegion) -> list[tirx.Var]:
    found: list[tirx.Var] = []
    for rng in region.region:
        tvm_ffi.structural_walk(rng.min, ((tirx.Var, found.append),))
    return found


def _vars_in_last(region: TensorRegion) -> list[tirx.Var]:
    """Variables of the innermost (contiguous) index of a region."""
    found: list[tirx.Var] = []
    tvm_ffi.structural_walk(region.region[-1].min, ((tirx.Var, found.append),))
    return found


def _plain_indices(sch: s_tir.Schedule, block: SBlockRV) -> bool:
    """Whether every buffer the block reads is indexed by block variables alone (or 0 on a
    unit axis): not one slice of a larger axis."""

    def plain(index: tirx.Expr, extent: tirx.Expr) -> bool:
        unit = isinstance(extent, tirx.IntImm) and int(extent) == 1
        return isinstance(index, tirx.Var) or (unit and isinstance(index, tirx.IntImm) and int(index) == 0)

    return all(plain(rng.min, extent) for region in sch.get(block).reads
               for rng, extent in zip(region.region, region.source.shape))


def _uses(region: TensorRegion, var: tirx.Var) -> bool:
    return any(v.same_as(var) for v in _vars_in(region))


def _vector_factor(extent: int, lanes: int) -> int:
    """Largest power of two <= lanes dividing extent: a split with no tail."""
    factor = lanes
    while factor > 1 and extent % factor != 0:
        factor //= 2
    return factor


def _leading_spatial_count(sch: s_tir.Schedule, block: SBlockRV) -> int:
    count = 0
    for iter_var in sch.get(block).iter_vars:
        if iter_var.iter_type != tirx.IterVar.DataPar:
            break
        count += 1
    return count


def _fuse(sch: s_tir.Schedule, loops: Sequence[LoopRV]) -> LoopRV:
    return sch.fuse(*loops) if len(loops) > 1 else loops[0]


def _vectorize_inner(sch: s_tir.Schedule, block: SBlockRV, lanes: int) -> bool:
    """Vectorize the innermost loop of ``block`` if its extent is static.

    A symbolic extent is left alone: TVM would need a tail predicate and then
    scalarizes the "vectorized" loop, while LLVM vectorizes the plain loop.
    """
    loops = sch.get_loops(block)
    if not loops:
        return False
    inner = loops[-1]
    extent = _static_extent(sch, inner)
    if extent is None or extent < 2:
        return False
    factor = _vector_factor(extent, lanes)
    if factor == 1:
        return False
    if extent > factor:
        inner = sch.split(inner, [None, factor])[1]
    sch.vectorize(inner)
    return True


def _contiguous_read_axis(sch: s_tir.Schedule, block: SBlockRV) -> int | None:
    """Iterator that some input has innermost but the output does not (a transpose)."""
    stmt = sch.get(block)
    iter_vars = [iv.var for iv in stmt.iter_vars]
    if len(stmt.writes) != 1 or not stmt.writes[0].region:
        return None
    write_last = stmt.writes[0].region[-1].min
    for read in stmt.reads:
        if len(read.region) < 2:
            continue
        last = read.region[-1].min
        for axis, var in enumerate(iter_vars):
            if last.same_as(var) and not write_last.same_as(var):
                return axis
    return None


def _parallel_unless(sch: s_tir.Schedule, serial: bool, loop: LoopRV) -> None:
    """Make `loop` parallel unless the kernel is to stay serial (CpuScheduleConfig.serial)."""
    if not serial:
        sch.parallel(loop)


def _schedule_injective_block(sch: s_tir.Schedule, block: SBlockRV, lanes: int, serial: bool = False) -> bool:
    """Parallel outer loops (serial: fused only) + vectorized inner loop for one injective block.

    Returns whether a loop was vectorized by TVM (False: rows only, inner loop
    left to LLVM). Assumes one loop per block iterator (trivial bindings).
    """
    loops = sch.get_loops(block)
    if not loops:
        return False
    inner = loops[-1]
    inner_extent = _static_extent(sch, inner)
    read_axis = _contiguous_read_axis(sch, block)
    # Iterator index == loop index only with one loop per iterator.
    if read_axis is not None and (
        read_axis >= len(loops) - 1 or len(loops) != len(sch.get(block).iter_vars)
    ):
        read_axis = None
    read_extent = None if read_axis is None else _static_extent(sch, loops[read_axis])

    if read_axis is not None and read_extent is not None and read_extent >= lanes:
        # Transpose: a lanes x lanes tile keeps the strided input rows in L1.
        # (With a symbolic output axis the vector runs along the input instead.)
        src_outer, src_inner = sch.split(loops[read_axis], [None, _vector_factor(read_extent, lanes)])
        if inner_extent is not None and _vector_factor(inner_extent, lanes) > 1:
            dst_outer, dst_inner = sch.split(inner, [None, _vector_factor(inner_extent, lanes)])
            rest = [loop for i, loop in enumerate(loops[:-1]) if i != read_axis]
            sch.reorder(*rest, src_outer, dst_outer, src_inner, dst_inner)
            sch.vectorize(dst_inner)
            _parallel_unless(sch, serial, _fuse(sch, [*rest, src_outer, dst_outer]))
            return True
        rest = [loop for i, loop in enumerate(loops) if i != read_axis]
        sch.reorder(*rest, src_outer, src_inner)
        sch.vectorize(src_inner)
        _parallel_unless(sch, serial, _fuse(sch, [*rest, src_outer]))
        return True

    if inner_extent is not None and _vector_factor(inner_extent, lanes) > 1:
        factor = _vector_factor(inner_extent, lanes)
        if inner_extent > factor:
            rest_inner, vec = sch.split(inner, [None, factor])
            outer_loops = [*loops[:-1], rest_inner]
        else:
            vec, outer_loops = inner, list(loops[:-1])
        sch.vectorize(vec)
        if outer_loops:
            _parallel_unless(sch, serial, _fuse(sch, outer_loops))
        return True

    # Symbolic (or odd) innermost axis: parallel rows, plain inner loop.
    if len(loops) > 1:
        _parallel_unless(sch, serial, _fuse(sch, loops[:-1]))
    else:
        _parallel_unless(sch, serial, inner)
    return False


def _inline_into_consumers(sch: s_tir.Schedule, blocks: Sequence[SBlockRV]) -> None:
    """Inline non-output producers into their consumers where TVM allows it."""
    outputs = sch.get_output_blocks(_root(sch))
    for block in blocks:
        if any(_same(sch, block, out) for out in outputs):
            continue
        try:
            sch.compute_inline(block)
        except ScheduleError:
            # Kept as its own loop nest; it is scheduled on its own.
            continue


def _is_under(sch: s_tir.Schedule, block: SBlockRV, loop: LoopRV) -> bool:
    return any(_same(sch, outer, loop) for outer in sch.get_loops(block))


# ---------------------------------------------------------------------- matmul rule


# TVM's kMaxStackAlloca: smaller constant-size global buffers become stack arrays.
_STACK_BYTES = 1024


@dataclasses.dataclass(frozen=True)
class _MatmulTile:
    rows: int
    vectors: int
    lanes: int

    @property
    def cols(self) -> int:
        return self.vectors * self.lanes


def _matmul_tile(
    extent_i: int | None, extent_j: int | None, cfg: CpuScheduleConfig, lanes: int
) -> _MatmulTile:
    """The configured register tile, fitted to static extents.

    Small extents (head_dim 16) shrink the tile; otherwise a halved tile that
    divides the extent beats padding it (padding copies the operand per call).
    """
    rows, vectors = cfg.tile_rows, cfg.tile_vectors
    # The accumulator must stay under TVM's stack limit (see _matmul_rule): 8 x 32 floats
    # is exactly 1 KiB, so AVX-512 tiles get 7 rows.
    while rows > 1 and rows * vectors * cfg.vector_bits // 8 >= _STACK_BYTES:
        rows -= 1
    if extent_i is not None:
        rows = max(min(rows, extent_i), 1)
        half = max(rows // 2, 1)
        if extent_i % rows != 0 and extent_i % half == 0:
            rows = half
    if extent_j is not None:
        if extent_j < lanes:
            lanes, vectors = max(extent_j, 1), 1
        else:
            vectors = max(min(vectors, extent_j // lanes), 1)
            if extent_j % (vectors * lanes) != 0 and extent_j % lanes == 0:
                vectors = 1
    return _MatmulTile(rows=rows, vectors=vectors, lanes=lanes)


def _check_matmul(sch: s_tir.Schedule, info: SBlockInfo) -> None:
    """Raise unless ``info`` is C[..., i, j] += A[..., i, k] * B[..., k, j] (any layout)."""
    kinds = info.dom_kind()
    if len(kinds) < 3 or not kinds.endswith("SSR") or "R" in kinds[:-1]:
        raise _RuleDoesNotApply(f"iteration kinds {kinds} are not a matmul")
    block = sch.get(info.block_rv)
    var_i, var_j, var_k = (iv.var for iv in block.iter_vars[-3:])
    if len(block.writes) != 1:
        raise _RuleDoesNotApply("matmul must write one buffer")
    out = block.writes[0]
    inputs = [r for r in block.reads if not r.source.same_as(out.source)]
    if len(inputs) != 2:
        raise _RuleDoesNotApply("matmul must read two buffers")
    lhs = [r for r in inputs if _uses(r, var_i) and _uses(r, var_k) and not _uses(r, var_j)]
    rhs = [r for r in inputs if _uses(r, var_j) and _uses(r, var_k) and not _uses(r, var_i)]
    if len(lhs) != 1 or len(rhs) != 1 or not _uses(out, var_j):
        raise _RuleDoesNotApply("operands do not index like a matmul")
    # The register tile vectorizes along j; a B read from memory with k innermost (Q @ K^T
    # over a [P, D] cache, tvm_views) would make every vector a gather: rows of dot
    # products, which the reduction rule vectorizes along k. (A B computed in the kernel,
    # such as decoded packed weights, is laid out for the tile by the rule itself.)
    computed = any(write.source.same_as(rhs[0].source) for producer in sch.get_producers(info.block_rv)
                   for write in sch.get(producer).writes)
    if not computed and any(v.same_as(var_k) for v in _vars_in_last(rhs[0])):
        raise _RuleDoesNotApply("B is read along k (a transposed operand)")


def _matmul_rule(sch: s_tir.Schedule, cfg: CpuScheduleConfig, pad: bool) -> str:
    infos = _block_infos(sch)
    reductions = [info for info in infos if not info.is_injective()]
    if len(reductions) != 1:
        raise _RuleDoesNotApply("a matmul kernel has exactly one reduction block")
    info = reductions[0]
    _check_matmul(sch, info)
    matmul = info.block_rv
    prologue_names = [i.name for i in infos[: infos.index(info)]]
    *_, loop_i, loop_j, _ = sch.get_loops(matmul)
    tile = _matmul_tile(
        _static_extent(sch, loop_i),
        _static_extent(sch, loop_j),
        cfg,
        cfg.lanes(_output_dtype(sch, matmul)),
    )
    rule = "matmul"
    if pad:
        padding = [1] * len(info.dom())
        for axis, size in ((-3, tile.rows), (-2, tile.cols)):
            extent = info.dom()[axis]
            if not isinstance(extent, int) or extent % size != 0:
                padding[axis] = size
        if any(p > 1 for p in padding):
            # TVM 0.27's pad_einsum mis-pads an operand read at a constant or an offset index
            # (one layer or head of a stacked tensor, tvm_views): the result is garbage.
            if not _plain_indices(sch, matmul):
                raise _RuleDoesNotApply("an operand is indexed by a constant or an offset: not padded")
            # Copies A (and B) into zero-padded buffers; the un-padding copy of C
            # becomes the first epilogue below.
            sch.pad_einsum(matmul, padding)
            rule = "matmul+pad"
    elif _static_extent(sch, loop_i) is None or _static_extent(sch, loop_j) is None:
        rule = "matmul+predicate"

    # A packed-weight decode feeding B is computed once per column tile into a small
    # [K, cols] panel that every row tile then reads contiguously (inlined, it would be
    # redone for every row and read the packed rows with gathers).
    decode = _packed_decode_of(sch, matmul, prologue_names) if cfg.panel and not pad_j(info, tile) else None
    # Other prologues (a fused transpose or dequantize) are read straight from the source;
    # one that cannot be inlined stays a loop nest of its own (scheduled below).
    _inline_into_consumers(sch, [sch.get_sblock(n) for n in prologue_names if decode is None or n != decode])
    # The write-back, un-padding and epilogues collapse into one block per tile.
    # "global", not "local": TVM lowers a global buffer under 1 KiB to a stack array, which
    # LLVM keeps in registers; any other goes to TVM's heap workspace, where each FMA's
    # result is stored back to memory (LLVM cannot prove the workspace does not alias
    # the padded input: measured 128 x 576 @ 576 x 1536 with symbolic rows, 1 thread,
    # 8.1 -> 2.7 ms). _matmul_tile keeps the tile under that size.
    chain = [sch.cache_write(matmul, 0, "global")]
    while True:
        consumers = sch.get_consumers(chain[-1])
        if len(consumers) != 1:
            break
        chain.append(consumers[0])
    for block in chain[:-1]:
        sch.compute_inline(block)
    tail = chain[-1]

    *batch, loop_i, loop_j, loop_k = sch.get_loops(matmul)
    rows_symbolic = _static_extent(sch, loop_i) is None
    tile_i, row = sch.split(loop_i, [None, tile.rows])
    tile_j, vector, lane = sch.split(loop_j, [None, tile.vectors, tile.lanes])
    # Column tiles outside row tiles: one K x cols panel of B is reused by
    # consecutive row tiles while it is still in L2.
    sch.reorder(tile_j, tile_i, loop_k, row, vector, lane)
    # Symbolic rows (a sequence length) stay a serial loop inside the parallel column
    # tiles: fused into the parallel loop, a row tile's index is a modulo of a symbolic
    # size, buffer compaction cannot bound the accumulator, and it stays in memory
    # instead of registers (measured 128 x 576 @ 576 x 1536, 2 threads: 5.1 -> 2.6 ms).
    if decode is not None:
        outer = _fuse(sch, [*batch, tile_j])
        _decode_panel(sch, sch.get_sblock(decode), outer, tile.lanes)
        rule = rule + "+panel"
    elif rows_symbolic:
        outer = _fuse(sch, [*batch, tile_j])
    else:
        outer = _fuse(sch, [*batch, tile_j, tile_i])

    sch.reverse_compute_at(tail, tile_i if rows_symbolic or decode is not None else outer)
    _vectorize_inner(sch, tail, tile.lanes)
    # Annotate before decompose_reduction: once the init is split off, the update
    # block no longer counts as a reduction and vectorize() refuses it.
    sch.unroll(row)
    sch.unroll(vector)
    sch.vectorize(lane)
    sch.parallel(outer)
    init = sch.decompose_reduction(matmul, loop_k)
    *_, init_row, init_vector, init_lane = sch.get_loops(init)
    sch.vectorize(init_lane)
    sch.unroll(init_vector)
    sch.unroll(init_row)

    # Left at the root besides the tiled nest: zero-padding copies, kept prologues.
    for block in sch.get_child_blocks(_root(sch)):
        if not _is_under(sch, block, outer):
            _schedule_injective_block(sch, block, cfg.lanes(_output_dtype(sch, block)))
    return rule


def pad_j(info: SBlockInfo, tile: _MatmulTile) -> bool:
    extent = info.dom()[-2]
    return not isinstance(extent, int) or extent % tile.cols != 0


def _reads_uint8(sch: s_tir.Schedule, block: SBlockRV) -> bool:
    return any(str(getattr(region.source, "dtype", "")) == "uint8" for region in sch.get(block).reads)


def _packed_decode_of(sch: s_tir.Schedule, matmul: SBlockRV, prologue_names: Sequence[str]) -> str | None:
    """The prologue that decodes packed uint8 weights into the matmul's B operand, if any."""
    for name in prologue_names:
        block = sch.get_sblock(name)
        if not _reads_uint8(sch, block):
            continue
        consumers = sch.get_consumers(block)
        if len(consumers) == 1 and _same(sch, consumers[0], matmul) and len(sch.get(block).iter_vars) == 2:
            return name
    return None


def _decode_panel(sch: s_tir.Schedule, decode: SBlockRV, outer: LoopRV, lanes: int) -> None:
    """Decode W[n, k] for one column tile into a [K, cols] panel (n contiguous), vectorized over n."""
    sch.transform_layout(decode, ("write", 0), lambda n, k: (k, n))
    sch.compute_at(decode, outer)
    loop_n, loop_k = sch.get_loops(decode)[-2:]
    sch.reorder(loop_k, loop_n)
    extent = _static_extent(sch, loop_n)
    if extent is not None and _vector_factor(extent, lanes) > 1:
        factor = _vector_factor(extent, lanes)
        if extent > factor:
            loop_n = sch.split(loop_n, [None, factor])[1]
        sch.vectorize(loop_n)


# The reduction block of edgec's N:M sparse kernel (targets/tvm_packed.qlinear_nm_gather_te).
SPARSE_MATMUL_BLOCK = "sparse_matmul"


def _sparse_matmul_rule(sch: s_tir.Schedule, cfg: CpuScheduleConfig) -> str:
    """N:M sparse kernel: parallel over rows x output vectors; for each, the kept weights
    are summed in registers, one vector of outputs at a time (the input is gathered per
    output, so the vector loads are gathers)."""
    infos = _block_infos(sch)
    found = [info for info in infos if info.name.startswith(SPARSE_MATMUL_BLOCK) and not info.is_injective()]
    if len(found) != 1 or len([info for info in infos if not info.is_injective()]) != 1:
        raise _RuleDoesNotApply("not edgec's sparse kernel")
    block = found[0].block_rv
    _inline_into_consumers(sch, [info.block_rv for info in infos[: infos.index(found[0])]])
    chain = [sch.cache_write(block, 0, "global")]  # a stack array (see _matmul_rule)
    while len(consumers := sch.get_consumers(chain[-1])) == 1:
        chain.append(consumers[0])
    for item in chain[:-1]:
        sch.compute_inline(item)
    *lead, loop_n, loop_j = sch.get_loops(block)
    lanes = cfg.lanes(_output_dtype(sch, block))
    extent = _static_extent(sch, loop_n)
    if extent is None or _vector_factor(extent, lanes) < 2:
        raise _RuleDoesNotApply("the outputs do not split into whole vectors")
    n_outer, n_inner = sch.split(loop_n, [None, _vector_factor(extent, lanes)])
    sch.reorder(n_outer, *lead, loop_j, n_inner)
    outer = _fuse(sch, [n_outer, *lead])
    sch.reverse_compute_at(chain[-1], outer)
    _vectorize_inner(sch, chain[-1], lanes)
    sch.vectorize(n_inner)
    sch.parallel(outer)
    init = sch.decompose_reduction(block, loop_j)
    sch.vectorize(sch.get_loops(init)[-1])
    for other in sch.get_child_blocks(_root(sch)):
        if not _is_under(sch, other, outer):
            _schedule_injective_block(sch, other, cfg.lanes(_output_dtype(sch, other)))
    return "sparse-matmul"


def _matmul_padded_rule(sch: s_tir.Schedule, cfg: CpuScheduleConfig) -> str:
    return _matmul_rule(sch, cfg, pad=True)


def _matmul_predicated_rule(sch: s_tir.Schedule, cfg: CpuScheduleConfig) -> str:
    return _matmul_rule(sch, cfg, pad=False)


# ------------------------------------------------------------------- reduction rule


def _shared_row_axes(sch: s_tir.Schedule, infos: Sequence[SBlockInfo], out: SBlockRV) -> int:
    """Leading axes that every block iterates exactly like the output block."""
    out_dom = next(i for i in infos if _same(sch, i.block_rv, out)).dom()
    shared = len(out_dom)
    for info in infos:
        count = 0
        for it, out_extent in zip(info.iters, out_dom):
            if it.kind != "S" or not _same_extent(it.dom, out_extent):
                break
            count += 1
        shared = min(shared, count)
    return shared


def _factor_reductions(
    sch: s_tir.Schedule, infos: Sequence[SBlockInfo], lanes: int
) -> list[SBlockRV]:
    """Split each static innermost reduction into ``lanes`` partial results.

    Returns the partial-result blocks, with the lane made their last block
    iterator so that compute_at rebuilds it as the innermost loop.
    """
    factored: list[SBlockRV] = []
    for info in infos:
        kinds = info.dom_kind()
        if info.is_injective() or not kinds.endswith("R") or kinds.count("R") != 1:
            continue
        reduce_loop = sch.get_loops(info.block_rv)[-1]
        extent = _static_extent(sch, reduce_loop)
        # Tail-free splits only: compute_at (TVM 0.27) drops the split predicate of
        # an rfactor block, which then reads past the row (wrong softmax over seq).
        if extent is None or extent % lanes != 0:
            continue
        lane = sch.split(reduce_loop, [None, lanes])[1]
        rank = len(sch.get(info.block_rv).writes[0].region)
        partial = sch.rfactor(lane, factor_axis=rank)
        iter_vars = sch.get(partial).iter_vars
        lane_iter = iter_vars[0]
        if lane_iter.iter_type != tirx.IterVar.DataPar or not _same_extent(
            int(lane_iter.dom.extent), lanes
        ):
            raise _RuleDoesNotApply("unexpected rfactor block layout")
        # rfactor makes the lane the first block iterator; move it last.
        sch.reorder_block_iter_var(partial, [*range(1, len(iter_vars)), 0])
        factored.append(partial)
    return factored


def _reduction_rule(sch: s_tir.Schedule, cfg: CpuScheduleConfig, rfactor: bool) -> str:
    infos = _block_infos(sch)
    feeds_reduction: set[str] = set()
    for info in infos:
        if not info.is_injective():
            for producer in sch.get_producers(info.block_rv):
                feeds_reduction.add(sch.get(producer).name_hint)
    # Inline elementwise chains, but keep what a reduction re-reads (exp in
    # softmax) so it is computed once per element, not once per consumer.
    _inline_into_consumers(
        sch, [i.block_rv for i in infos if i.is_injective() and i.name not in feeds_reduction]
    )
    outputs = sch.get_output_blocks(_root(sch))
    if len(outputs) != 1:
        raise _RuleDoesNotApply("reduction rule needs a single output block")
    out = outputs[0]
    infos = _block_infos(sch)
    rows = _shared_row_axes(sch, infos, out)
    if rows == 0:
        raise _RuleDoesNotApply("no spatial axis shared by all blocks")
    lanes = cfg.lanes(_output_dtype(sch, out))
    factored = _factor_reductions(sch, infos, lanes) if rfactor else []

    out_loops = sch.get_loops(out)
    shared = list(out_loops[:rows])
    # A symbolic innermost row axis under static ones (a decode step's scores over the
    # context, a prefill's query positions) stays a serial loop inside the parallel one:
    # fused into it, every iteration recovered its indices with divisions by the
    # symbolic extent, most of SmolLM2's decode attention at 1,024 tokens of context.
    inner = None
    if len(shared) > 1 and _static_extent(sch, shared[-1]) is None and any(
        _static_extent(sch, loop) is not None for loop in shared[:-1]
    ):
        inner = shared.pop()
    row = _fuse(sch, shared)
    if len(out_loops) > rows + 1:
        sch.fuse(*out_loops[rows:])
    # An output block that is itself the reduction (a row of dot products) keeps its
    # reduced loop serial: only its rfactor partials are vectorized.
    if len(out_loops) > rows and _leading_spatial_count(sch, out) == len(sch.get(out).iter_vars):
        _vectorize_inner(sch, out, lanes)
    _parallel_unless(sch, cfg.serial, row)

    # Every other block is computed per row: intermediates shrink to one row.
    others = [b for b in sch.get_child_blocks(_root(sch)) if not _same(sch, b, out)]
    for block in reversed(others):
        sch.compute_at(block, row if inner is None else inner, preserve_unit_loops=True)
    for block in others:
        if any(_same(sch, block, f) for f in factored):
            sch.vectorize(sch.get_loops(block)[-1])
            # After vectorize (see _matmul_rule): the zero-fill becomes its own loop.
            init = sch.decompose_reduction(block, sch.get_loops(block)[-2])
            sch.vectorize(sch.get_loops(init)[-1])
            # lanes partial sums per row: "global" keeps them off the heap (see _matmul_rule:
            # TVM 0.27 gives only global buffers under 1 KiB a stack array; a "local" one was
            # a workspace allocation per row, per score of a decode step's attention).
            sch.set_scope(block, 0, "global")
        elif _leading_spatial_count(sch, block) == len(sch.get(block).iter_vars):
            _vectorize_inner(sch, block, lanes)
    return "reduction+rfactor" if factored else "reduction"


def _reduction_rfactor_rule(sch: s_tir.Schedule, cfg: CpuScheduleConfig) -> str:
    return _reduction_rule(sch, cfg, rfactor=True)


def _reduction_plain_rule(sch: s_tir.Schedule, cfg: CpuScheduleConfig) -> str:
    return _reduction_rule(sch, cfg, rfactor=False)


# ------------------------------------------------------------ injective / fallback


def _injective_rule(sch: s_tir.Schedule, cfg: CpuScheduleConfig) -> str:
    infos = _block_infos(sch)
    if not all(info.is_injective() for info in infos):
        raise _RuleDoesNotApply("has a reduction")
    _inline_into_consumers(sch, [info.block_rv for info in infos])
    blocks = [b for b in sch.get_child_blocks(_root(sch)) if sch.get_loops(b)]
    if not blocks:
        raise _RuleDoesNotApply("scalar function: no loop to schedule")
    vectorized = True
    for block in blocks:
        lanes = cfg.lanes(_output_dtype(sch, block))
        vectorized = _schedule_injective_block(sch, block, lanes, cfg.serial) and vectorized
    return "injective" if vectorized else "injective-rows"


def _parallel_rule(sch: s_tir.Schedule, cfg: CpuScheduleConfig) -> str:
    """Make the outer spatial loops of every top-level loop nest parallel, where legal."""
    if cfg.serial:
        return "serial"
    applied = False
    for block in sch.get_child_blocks(_root(sch)):
        loops = sch.get_loops(block)
        spatial = min(_leading_spatial_count(sch, block), len(loops))
        if spatial == 0:
            continue
        try:
            sch.parallel(_fuse(sch, loops[:spatial]))
            applied = True
        except ScheduleError:
            # The bindings are not one loop per axis: try the outermost loop alone.
            try:
                sch.parallel(sch.get_loops(block)[0])
                applied = True
            except ScheduleError:
                continue
    if not applied:
        raise _RuleDoesNotApply("no loop can be parallel")
    return "parallel"


def _candidate_rules(func: tirx.PrimFunc) -> list[_Rule]:
    """Most specific rule first."""
    infos = normalize_prim_func(s_tir.Schedule(func))
    if infos is None:
        return [_parallel_rule]
    if all(info.is_injective() for info in infos):
        return [_injective_rule, _parallel_rule]
    return [
        _sparse_matmul_rule,
        _matmul_padded_rule,
        _matmul_predicated_rule,
        _reduction_rfactor_rule,
        _reduction_plain_rule,
        _parallel_rule,
    ]


# A parallel loop wakes TVM's thread pool, whose threads yield to the OS while they
# wait: about 1-3 us a launch on a 2-vCPU VM, more than a serial vectorized loop over
# a few thousand floats takes. A decode step of SmolLM2 runs ~600 such kernels (norms,
# rotary, activations, residual adds over one token's 576 or 1,536 values).
SERIAL_ELEMENTS = 16384


def touches_few_elements(func: tirx.PrimFunc, small_vars: frozenset[str]) -> bool:
    """Whether `func`'s parameter buffers hold at most SERIAL_ELEMENTS values in all,
    with the symbolic sizes named in `small_vars` at 1 (a decode step's batch); any
    other symbolic size (the context) counts as large."""
    if not small_vars:
        return False
    analyzer = Analyzer()
    total = 0
    for param in func.params:
        shape = getattr(param, "shape", None)
        if shape is None:
            continue
        size = tirx.const(1, "int64")
        for dim in shape:
            size = size * dim
        free: list[tirx.Var] = []
        tvm_ffi.structural_walk(size, ((tirx.Var, free.append),))
        for var in free:
            if var.name in small_vars:
                analyzer.bind(var, 1)
        size = analyzer.simplify(size)
        if not isinstance(size, tirx.IntImm):
            return False
        total += int(size)
    return total <= SERIAL_ELEMENTS


def schedule_prim_func(
    func: tirx.PrimFunc, config: CpuScheduleConfig, small_vars: frozenset[str] = frozenset()
) -> tuple[tirx.PrimFunc, str]:
    """Schedule one PrimFunc with the first rule that applies; return it and the rule.
    A kernel that touches few elements with `small_vars` at 1 (touches_few_elements)
    gets serial loops from the elementwise and row-reduction rules ("+serial")."""
    serial = touches_few_elements(func, small_vars)
    if serial:
        config = dataclasses.replace(config, serial=True)
    for rule in _candidate_rules(func):
        sch = s_tir.Schedule(func)
        try:
            name = rule(sch, config)
        # ScheduleError: a primitive refused; InternalError: a TVM check inside a
        # primitive failed on an unusual function. Either way: try a simpler rule.
        except (ScheduleError, tvm.error.InternalError, _RuleDoesNotApply) as err:
            if was_interrupted():  # TVM's FFI hands a Ctrl-C back as an error of its own
                raise KeyboardInterrupt from None
            _LOG.debug("%s does not apply: %s", rule.__name__, err)
            continue
        if serial and not name.startswith(("matmul", "sparse")) and name != "serial":
            name += "+serial"
        scheduled = sch.mod["main"].with_attr(RULE_ATTR, name)
        return scheduled.with_attr(_SCHEDULED_ATTR, True), name
    return func.with_attr(RULE_ATTR, "none"), "none"


def _is_scheduled(func: tirx.PrimFunc) -> bool:
    return bool(func.attrs is not None and func.attrs.get(_SCHEDULED_ATTR, False))


# ----------------------------------------------------------------------------- passes


def workload_key(func: tirx.PrimFunc) -> str:
    """Identifies a kernel's workload (same computation and shapes -> same key) across
    processes: what tuning records are stored and looked up by."""
    return f"{tvm_ffi.structural_hash(func) & 0xFFFFFFFFFFFFFFFF:016x}"


def schedule_cpu_funcs(target: Target, chosen: dict[str, CpuScheduleConfig] | None = None,
                       small_vars: frozenset[str] = frozenset()) -> tvm.transform.Pass:
    """Module pass: schedule every PrimFunc not marked ``tirx.is_scheduled``; a function
    whose workload_key is in ``chosen`` (tuning results) gets that config. `small_vars`:
    symbolic sizes that are 1 in practice (a decode step's batch; schedule_prim_func)."""
    config = CpuScheduleConfig.from_target(target)
    chosen = chosen or {}

    @tvm.transform.module_pass(opt_level=0, name="EdgecScheduleCpuFuncs")
    def _schedule(mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        updates: dict[tvm.ir.GlobalVar, tirx.PrimFunc] = {}
        for gvar, func in mod.functions_items():
            if isinstance(func, tirx.PrimFunc) and not _is_scheduled(func):
                scheduled, rule = schedule_prim_func(func, chosen.get(workload_key(func), config), small_vars)
                _LOG.debug("%s: %s", gvar.name_hint, rule)
                updates[gvar] = scheduled
        for gvar, func in updates.items():
            mod.update_func(gvar, func)
        return mod

    return _schedule


def _split_default_pipeline(
    target: Target,
) -> tuple[list[tvm.transform.Pass], list[tvm.transform.Pass]]:
    """TVM's default llvm pipeline, split right after RewriteDataflowReshape.

    Scheduling comes after that pass because it spots reshape PrimFuncs by their
    unscheduled loop pattern and turns them into views; a scheduled reshape
    would stay a copy.
    """
    lower = cpu_generic.dataflow_lower_passes(target)
    cut = [p.info.name for p in lower].index("RewriteDataflowReshape") + 1
    head = [
        *cpu_generic.library_dispatch_passes(target),
        *cpu_generic.legalize_passes(target),
        *lower[:cut],
        schedule_cpu_funcs(target),
    ]
    tail = [*lower[cut:], *cpu_generic.finalize_passes(target)]
    return head, tail


def cpu_pipeline(target: Target) -> tvm.transform.Pass:
    """TVM's default llvm Relax pipeline plus ``schedule_cpu_funcs`` after fusion.

    Use as ``tvm.compile(mod, target, relax_pipeline=cpu_pipeline(target))``.
    """
    head, tail = _split_default_pipeline(target)

    @tvm.transform.module_pass(opt_level=0, name="EdgecCpuPipeline")
    def _pipeline(mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        with target:
            return tvm.transform.Sequential([*head, *tail])(mod)

    return _pipeline


def finish_pipeline(target: Target) -> tvm.transform.Pass:
    """The rest of ``cpu_pipeline`` after ``scheduled_module``: scheduling once, then
    ``tvm.compile(scheduled, target, relax_pipeline=finish_pipeline(target))``."""
    _, tail = _split_default_pipeline(target)

    @tvm.transform.module_pass(opt_level=0, name="EdgecCpuPipelineFinish")
    def _pipeline(mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        with target:
            return tvm.transform.Sequential(tail)(mod)

    return _pipeline


def fused_module(mod: IRModule, target: Target) -> IRModule:
    """``cpu_pipeline`` up to scheduling: legalized, fused, unscheduled PrimFuncs (what tuning measures)."""
    head, _ = _split_default_pipeline(target)
    with target:
        return tvm.transform.Sequential(head[:-1])(mod)


def scheduled_module(mod: IRModule, target: Target) -> IRModule:
    """``cpu_pipeline`` up to and including scheduling (for reports and tests)."""
    return schedule_fused(fused_module(mod, target), target)


def schedule_fused(fused: IRModule, target: Target, chosen: dict[str, CpuScheduleConfig] | None = None,
                   small_vars: frozenset[str] = frozenset()) -> IRModule:
    """Schedule a ``fused_module`` (so tuning and the build share one fusion run)."""
    with target:
        return schedule_cpu_funcs(target, chosen, small_vars)(fused)


# ---------------------------------------------------------------------------- reports


def schedule_report(mod: IRModule) -> dict[str, str]:
    """PrimFunc name -> rule applied ("prescheduled" / "unscheduled" if not by us)."""
    report: dict[str, str] = {}
    for gvar, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        attrs = func.attrs
        if attrs is not None and RULE_ATTR in attrs:
            report[gvar.name_hint] = str(attrs[RULE_ATTR])
        else:
            report[gvar.name_hint] = "prescheduled" if _is_scheduled(func) else "unscheduled"
    return dict(sorted(report.items()))


def loop_kinds(func: tirx.PrimFunc) -> set[str]:
    """Kinds of the loops in ``func``, e.g. {"parallel", "serial", "vectorized"}."""
    kinds: set[str] = set()

    def _visit(loop: tirx.For) -> None:
        kinds.add(tirx.ForKind(int(loop.kind)).name.lower())

    tvm_ffi.structural_walk(func.body, ((tirx.For, _visit),))
    return kinds
