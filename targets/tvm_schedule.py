"""Rule-based (tuning-free) CPU schedules for every PrimFunc of a Relax module.

Before: TVM 0.27's default ``llvm`` Relax pipeline legalizes and fuses operators
but schedules no PrimFunc, so every kernel is a serial, scalar loop nest (an LLM
prefill runs ~170x slower than ONNX Runtime).

After: ``cpu_pipeline(target)`` is the same pipeline with ``schedule_cpu_funcs``
inserted right after fusion (and after dataflow reshapes became views). Each
PrimFunc gets the first rule that applies, tried on a fresh schedule each time:

* ``matmul``: register-tiled ``rows x (vectors * lanes)`` accumulator in a local
  buffer, innermost axis vectorized, the batch / row-tile / column-tile loops
  fused and parallel, reduction init hoisted, epilogues (bias, SiLU, ...)
  computed per tile.
* ``reduction`` (RMSNorm, softmax, mean): parallel over the leading spatial axes,
  every block computed per row, inner axes vectorized; ``reduction+rfactor``
  also vectorizes the reductions themselves through ``lanes`` partial sums.
* ``injective`` (elementwise, broadcast, transpose): producers inlined, loops
  fused, the outer part parallel and the inner part vectorized.
* ``parallel``: the fallback -- only the outer spatial loops made parallel.
* ``none``: no rule applied (the function stays as TVM legalized it).

The rule applied is stored in the PrimFunc attribute ``edgec.schedule_rule``
and read back by ``schedule_report``. Shapes may be symbolic: tails are
handled by the predicates that ``split`` adds.
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
from tvm.target import Target
from tvm.target.codegen import llvm_get_vector_width

__all__ = [
    "RULE_ATTR",
    "CpuScheduleConfig",
    "cpu_pipeline",
    "loop_kinds",
    "schedule_cpu_funcs",
    "schedule_prim_func",
    "schedule_report",
    "scheduled_module",
]

RULE_ATTR = "edgec.schedule_rule"
# The attribute dlight and MetaSchedule use to mark a function as done.
_SCHEDULED_ATTR = "tirx.is_scheduled"


class _RuleDoesNotApply(Exception):
    """The function does not have the shape a rule expects (not an error)."""


# A rule mutates the schedule in place and returns the name to report, or raises
# ScheduleError / _RuleDoesNotApply (then the next, simpler rule is tried).
_Rule = Callable[[s_tir.Schedule, "CpuScheduleConfig"], str]
_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CpuScheduleConfig:
    """Target facts the rules need.

    vector_bits: width of one SIMD register (512 for AVX-512, 128 for NEON).
    tile_rows / tile_vectors: matmul register tile, in rows and in SIMD vectors
    per row; 8 x 2 fills 16 of the 32 registers AVX-512 and NEON have.
    """

    vector_bits: int
    tile_rows: int = 8
    tile_vectors: int = 2

    @staticmethod
    def from_target(target: Target) -> CpuScheduleConfig:
        bits = int(llvm_get_vector_width(target))
        if bits <= 0:
            # LLVM could not tell (unknown cpu): every 64-bit target has 128-bit SIMD.
            bits = 128
        # x86 without AVX-512 has only 16 vector registers: halve the tile rows.
        is_aarch64 = str(target.attrs.get("mtriple", "")).startswith("aarch64")
        rows = 8 if bits >= 512 or is_aarch64 else 4
        return CpuScheduleConfig(vector_bits=bits, tile_rows=rows)

    def lanes(self, dtype: str) -> int:
        """Vector lanes for one element type (bool counts as one byte)."""
        bits = max(tvm.DataType(dtype).bits, 8)
        return max(self.vector_bits // bits, 1)


# --------------------------------------------------------------------------- helpers


def _root(sch: s_tir.Schedule) -> SBlockRV:
    return sch.get_sblock("root")


def _static_extent(sch: s_tir.Schedule, loop: LoopRV) -> int | None:
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else None


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


def _uses(region: TensorRegion, var: tirx.Var) -> bool:
    return any(v.same_as(var) for v in _vars_in(region))


def _same_extent(a: int | tirx.PrimExpr, b: int | tirx.PrimExpr) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return bool(tvm_ffi.structural_equal(a, b))


def _vector_factor(extent: int, lanes: int) -> int:
    """Largest power of two <= lanes that divides extent: a split with no tail."""
    factor = lanes
    while factor > 1 and extent % factor != 0:
        factor //= 2
    return factor


def _vectorize_inner(sch: s_tir.Schedule, block: SBlockRV, lanes: int) -> LoopRV | None:
    """Vectorize the innermost loop of ``block``; return the loop left above it."""
    loops = sch.get_loops(block)
    if not loops:
        return None
    inner = loops[-1]
    extent = _static_extent(sch, inner)
    if extent is not None and extent <= lanes:
        if extent > 1:
            sch.vectorize(inner)
        return None
    factor = lanes if extent is None else _vector_factor(extent, lanes)
    if factor == 1:
        # A prime-ish static extent: accept a predicated tail rather than no SIMD.
        factor = lanes
    outer, vec = sch.split(inner, [None, factor])
    sch.vectorize(vec)
    return outer


def _leading_spatial_count(sch: s_tir.Schedule, block: SBlockRV) -> int:
    count = 0
    for iter_var in sch.get(block).iter_vars:
        if iter_var.iter_type != tirx.IterVar.DataPar:
            break
        count += 1
    return count


def _parallel_vectorize(sch: s_tir.Schedule, block: SBlockRV, lanes: int) -> None:
    """Fuse all loops of an injective block: vectorized inner part, parallel rest."""
    loops = sch.get_loops(block)
    if not loops:
        return
    inner_extent = _static_extent(sch, loops[-1])
    if inner_extent is not None and inner_extent >= 2 and _vector_factor(inner_extent, lanes) > 1:
        # A static innermost axis (hidden size, head dim) vectorizes with no tail.
        factor = _vector_factor(inner_extent, lanes)
        if inner_extent == factor:
            vec, outer_loops = loops[-1], list(loops[:-1])
        else:
            rest, vec = sch.split(loops[-1], [None, factor])
            outer_loops = [*loops[:-1], rest]
        sch.vectorize(vec)
        if outer_loops:
            sch.parallel(sch.fuse(*outer_loops) if len(outer_loops) > 1 else outer_loops[0])
        return
    # Symbolic innermost axis: vectorize the flattened nest, with a predicated tail.
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    outer, vec = sch.split(fused, [None, lanes])
    sch.vectorize(vec)
    sch.parallel(outer)


def _inline_injective(sch: s_tir.Schedule, blocks: Sequence[SBlockRV]) -> None:
    """Inline producers into their consumers where TVM allows it."""
    outputs = sch.get_output_blocks(_root(sch))
    for block in blocks:
        if any(sch.get(block).same_as(sch.get(out)) for out in outputs):
            continue
        try:
            sch.compute_inline(block)
        except ScheduleError:
            # Kept as its own loop nest; it gets scheduled on its own.
            continue


# ----------------------------------------------------------------------------- rules


def _matmul_operands(sch: s_tir.Schedule, info: SBlockInfo) -> None:
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


@dataclasses.dataclass(frozen=True)
class _MatmulTile:
    rows: int
    vectors: int
    lanes: int

    @property
    def cols(self) -> int:
        return self.vectors * self.lanes


def _matmul_tile(extent_i: int | None, extent_j: int | None, cfg: CpuScheduleConfig, lanes: int) -> _MatmulTile:
    """The configured register tile, shrunk to small static extents (head_dim 16...)."""
    rows, vectors = cfg.tile_rows, cfg.tile_vectors
    if extent_i is not None:
        rows = max(min(rows, extent_i), 1)
    if extent_j is not None:
        if extent_j < lanes:
            lanes, vectors = max(extent_j, 1), 1
        else:
            vectors = max(min(vectors, extent_j // lanes), 1)
    return _MatmulTile(rows=rows, vectors=vectors, lanes=lanes)


def _matmul_rule(sch: s_tir.Schedule, cfg: CpuScheduleConfig, pad: bool) -> str:
    infos = _block_infos(sch)
    reductions = [info for info in infos if not info.is_injective()]
    if len(reductions) != 1:
        raise _RuleDoesNotApply("a matmul kernel has exactly one reduction block")
    info = reductions[0]
    _matmul_operands(sch, info)
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
        # Pad rows / columns to whole tiles (symbolic seq len): a tail predicate
        # inside the k loop would keep the accumulator out of registers.
        extents = info.dom()
        padding = [1] * len(extents)
        for axis, size in ((-3, tile.rows), (-2, tile.cols)):
            extent = extents[axis]
            if not isinstance(extent, int) or extent % size != 0:
                padding[axis] = size
        if any(p > 1 for p in padding):
            sch.pad_einsum(matmul, padding)
            rule = "matmul+pad"
    elif _static_extent(sch, loop_i) is None or _static_extent(sch, loop_j) is None:
        rule = "matmul+predicate"

    # Prologues (a fused transpose or dequantize) are read straight from the source.
    for name in prologue_names:
        sch.compute_inline(sch.get_sblock(name))
    # Write-back, un-padding and epilogues collapse into one block computed per tile.
    chain = [sch.cache_write(matmul, 0, "local")]
    while True:
        consumers = sch.get_consumers(chain[-1])
        if len(consumers) != 1:
            break
        chain.append(consumers[0])
    for block in chain[:-1]:
        sch.compute_inline(block)
    tail = chain[-1]

    *batch, loop_i, loop_j, loop_k = sch.get_loops(matmul)
    tile_i, row = sch.split(loop_i, [None, tile.rows])
    tile_j, vector, lane = sch.split(loop_j, [None, tile.vectors, tile.lanes])
    sch.reorder(tile_j, tile_i, loop_k, row, vector, lane)
    outer = sch.fuse(*batch, tile_j, tile_i)

    sch.reverse_compute_at(tail, outer)
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

    # What is left at the root besides the tiled nest: the zero-padding copies.
    for block in sch.get_child_blocks(_root(sch)):
        if not _is_under(sch, block, outer):
            _parallel_vectorize(sch, block, cfg.lanes(_output_dtype(sch, block)))
    return rule


def _is_under(sch: s_tir.Schedule, block: SBlockRV, loop: LoopRV) -> bool:
    target = sch.get(loop)
    return any(sch.get(l).same_as(target) for l in sch.get_loops(block))


def _matmul_padded_rule(sch: s_tir.Schedule, cfg: CpuScheduleConfig) -> str:
    return _matmul_rule(sch, cfg, pad=True)


def _matmul_predicated_rule(sch: s_tir.Schedule, cfg: CpuScheduleConfig) -> str:
    return _matmul_rule(sch, cfg, pad=False)


def _leading_shared_spatial(sch: s_tir.Schedule, infos: Sequence[SBlockInfo], out: SBlockRV) -> int:
    """Leading axes every block iterates like the output block does (the row axes)."""
    out_info = next(i for i in infos if sch.get(i.block_rv).same_as(sch.get(out)))
    out_dom = out_info.dom()
    shared = len(out_dom)
    for info in infos:
        count = 0
        for it, out_extent in zip(info.iters, out_dom):
            if it.kind != "S" or not _same_extent(it.dom, out_extent):
                break
            count += 1
        shared = min(shared, count)
    return shared


def _reduction_rule(sch: s_tir.Schedule, cfg: CpuScheduleConfig, rfactor: bool) -> str:
    infos = _block_infos(sch)
    feeds_reduction: set[str] = set()
    for info in infos:
        if not info.is_injective():
            for producer in sch.get_producers(info.block_rv):
                feeds_reduction.add(sch.get(producer).name_hint)
    # Inline scalar/elementwise chains, but keep what a reduction re-reads (exp in
    # softmax) so it is computed once per row, not once per consumer.
    _inline_injective(
        sch,
        [i.block_rv for i in infos if i.is_injective() and i.name not in feeds_reduction],
    )
    outputs = sch.get_output_blocks(_root(sch))
    if len(outputs) != 1:
        raise _RuleDoesNotApply("reduction rule needs a single output block")
    out = outputs[0]
    infos = _block_infos(sch)
    rows = _leading_shared_spatial(sch, infos, out)
    if rows == 0:
        raise _RuleDoesNotApply("no spatial axis shared by all blocks")
    lanes = cfg.lanes(_output_dtype(sch, out))

    factored = _factor_reductions(sch, infos, lanes) if rfactor else []

    out_loops = sch.get_loops(out)
    row = sch.fuse(*out_loops[:rows]) if rows > 1 else out_loops[0]
    remaining = out_loops[rows:]
    if len(remaining) > 1:
        sch.fuse(*remaining)
    if remaining:
        _vectorize_inner(sch, out, lanes)
    sch.parallel(row)

    # Every other block is computed per row, so intermediates shrink to one row.
    others = [b for b in sch.get_child_blocks(_root(sch)) if not sch.get(b).same_as(sch.get(out))]
    for block in reversed(others):
        sch.compute_at(block, row, preserve_unit_loops=True)
    for block in others:
        if any(sch.get(block).same_as(sch.get(f)) for f in factored):
            lane_loop = sch.get_loops(block)[-1]
            sch.vectorize(lane_loop)
            # After vectorize (see _matmul_rule): the zero-fill becomes its own loop.
            init = sch.decompose_reduction(block, sch.get_loops(block)[-2])
            sch.vectorize(sch.get_loops(init)[-1])
        elif _leading_spatial_count(sch, block) == len(sch.get(block).iter_vars):
            _vectorize_inner(sch, block, lanes)
    return "reduction+rfactor" if factored else "reduction"


def _factor_reductions(sch: s_tir.Schedule, infos: Sequence[SBlockInfo], lanes: int) -> list[SBlockRV]:
    """Split each innermost reduction into ``lanes`` partial results (one SIMD vector).

    Returns the partial-result blocks; their lane axis is made the last block
    iterator, so compute_at later rebuilds it as the innermost (vectorizable) loop.
    """
    factored: list[SBlockRV] = []
    for info in infos:
        kinds = info.dom_kind()
        if info.is_injective() or not kinds.endswith("R") or kinds.count("R") != 1:
            continue
        reduce_loop = sch.get_loops(info.block_rv)[-1]
        extent = _static_extent(sch, reduce_loop)
        # Only tail-free splits: compute_at (TVM 0.27) drops the split predicate of
        # an rfactor block, which would read past the row (wrong softmax over seq).
        if extent is None or extent % lanes != 0:
            continue
        _, lane = sch.split(reduce_loop, [None, lanes])
        rank = len(sch.get(info.block_rv).writes[0].region)
        partial = sch.rfactor(lane, factor_axis=rank)
        # rfactor makes the lane the first block iterator; move it to the end.
        iter_vars = sch.get(partial).iter_vars
        lane_iter = iter_vars[0]
        if lane_iter.iter_type != tirx.IterVar.DataPar or not _same_extent(
            int(lane_iter.dom.extent), lanes
        ):
            raise _RuleDoesNotApply("unexpected rfactor block layout")
        sch.reorder_block_iter_var(partial, [*range(1, len(iter_vars)), 0])
        factored.append(partial)
    return factored


def _reduction_rfactor_rule(sch: s_tir.Schedule, cfg: CpuScheduleConfig) -> str:
    return _reduction_rule(sch, cfg, rfactor=True)


def _reduction_plain_rule(sch: s_tir.Schedule, cfg: CpuScheduleConfig) -> str:
    return _reduction_rule(sch, cfg, rfactor=False)


def _injective_rule(sch: s_tir.Schedule, cfg: CpuScheduleConfig) -> str:
    infos = _block_infos(sch)
    if not all(info.is_injective() for info in infos):
        raise _RuleDoesNotApply("has a reduction")
    _inline_injective(sch, [info.block_rv for info in infos])
    for block in sch.get_child_blocks(_root(sch)):
        _parallel_vectorize(sch, block, cfg.lanes(_output_dtype(sch, block)))
    return "injective"


def _parallel_rule(sch: s_tir.Schedule, cfg: CpuScheduleConfig) -> str:
    """Make the outer spatial loops of every top-level loop nest parallel, where legal."""
    del cfg  # the fallback needs no target facts
    applied = False
    for block in sch.get_child_blocks(_root(sch)):
        loops = sch.get_loops(block)
        spatial = min(_leading_spatial_count(sch, block), len(loops))
        if spatial == 0:
            continue
        try:
            outer = sch.fuse(*loops[:spatial]) if spatial > 1 else loops[0]
            sch.parallel(outer)
            applied = True
        except ScheduleError:
            # Bindings are not one loop per axis, or a sibling block is a reduction.
            try:
                sch.parallel(loops[0])
                applied = True
            except ScheduleError:
                continue
    if not applied:
        raise _RuleDoesNotApply("no loop can be parallel")
    return "parallel"


def _candidate_rules(func: tirx.PrimFunc) -> list[_Rule]:
    """Most specific rule first; each is tried on a fresh schedule."""
    infos = normalize_prim_func(s_tir.Schedule(func))
    if infos is None:
        return [_parallel_rule]
    if all(info.is_injective() for info in infos):
        return [_injective_rule, _parallel_rule]
    return [
        _matmul_padded_rule,
        _matmul_predicated_rule,
        _reduction_rfactor_rule,
        _reduction_plain_rule,
        _parallel_rule,
    ]


def schedule_prim_func(func: tirx.PrimFunc, config: CpuScheduleConfig) -> tuple[tirx.PrimFunc, str]:
    """Schedule one PrimFunc with the first rule that applies; return it and the rule name."""
    for rule in _candidate_rules(func):
        sch = s_tir.Schedule(func)
        try:
            name = rule(sch, config)
        except (ScheduleError, _RuleDoesNotApply) as err:
            _LOG.debug("%s does not schedule %s: %s", rule.__name__, _func_name(func), err)
            continue
        scheduled = sch.mod["main"].with_attr(RULE_ATTR, name).with_attr(_SCHEDULED_ATTR, True)
        return scheduled, name
    return func.with_attr(RULE_ATTR, "none"), "none"


def _func_name(func: tirx.PrimFunc) -> str:
    attrs = func.attrs
    return str(attrs["global_symbol"]) if attrs is not None and "global_symbol" in attrs else "<primfunc>"


def _is_scheduled(func: tirx.PrimFunc) -> bool:
    return bool(func.attrs is not None and func.attrs.get(_SCHEDULED_ATTR, False))


# ----------------------------------------------------------------------------- passes


def schedule_cpu_funcs(target: Target) -> tvm.transform.Pass:
    """Module pass: schedule every PrimFunc that is not marked ``tirx.is_scheduled``."""
    config = CpuScheduleConfig.from_target(target)

    @tvm.transform.module_pass(opt_level=0, name="EdgecScheduleCpuFuncs")
    def _schedule(mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        updates: dict[tvm.ir.GlobalVar, tirx.PrimFunc] = {}
        for gvar, func in mod.functions_items():
            if isinstance(func, tirx.PrimFunc) and not _is_scheduled(func):
                updates[gvar] = schedule_prim_func(func, config)[0]
        for gvar, func in updates.items():
            mod.update_func(gvar, func)
        return mod

    return _schedule


def _passes_up_to_schedule(target: Target) -> tuple[list[tvm.transform.Pass], list[tvm.transform.Pass]]:
    """TVM's default llvm pipeline split right after RewriteDataflowReshape.

    The schedule goes after that pass because it recognizes reshape PrimFuncs by
    their unscheduled pattern and turns them into views; a scheduled reshape would
    stay a copy.
    """
    lower = cpu_generic.dataflow_lower_passes(target)
    names = [p.info.name for p in lower]
    cut = names.index("RewriteDataflowReshape") + 1
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
    head, tail = _passes_up_to_schedule(target)

    @tvm.transform.module_pass(opt_level=0, name="EdgecCpuPipeline")
    def _pipeline(mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        with target:
            return tvm.transform.Sequential([*head, *tail])(mod)

    return _pipeline


def scheduled_module(mod: IRModule, target: Target) -> IRModule:
    """Run ``cpu_pipeline`` up to and including scheduling (for reports and tests)."""
    head, _ = _passes_up_to_schedule(target)
    with target:
        return tvm.transform.Sequential(head)(mod)


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
    """Kinds of the loops in ``func``: subset of serial/parallel/vectorized/unrolled/..."""
    kinds: set[str] = set()

    def _visit(loop: tirx.For) -> None:
        kinds.add(tirx.ForKind(int(loop.kind)).name.lower())

    tvm_ffi.structural_walk(func.body, ((tirx.For, _visit),))
    return kinds
