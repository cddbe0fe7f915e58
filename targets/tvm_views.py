"""Batched matmuls that read their operands' views in place.

torch.export decomposes a batched matmul that broadcasts (GQA attention: every query
head of a group meets its one KV head) into expand -> reshape to 3-D -> bmm, and TVM's
importer keeps that: `matmul(reshape(broadcast_to(permute_dims(expand_dims(K)))), ...)`.
Each view op becomes a copy kernel, so a decode step copied the whole KV cache several
times per layer (SmolLM2 at 1,024 tokens of context: ~60 of 112 ms in broadcast,
transpose and reshape copies) to then read it once.

`read_views_in_place` rewrites such a matmul into one TE kernel over the tensors the
views were taken of: the broadcast, transposes and inserted axes become index
arithmetic (and a conversion of a cache kept in float16 happens as it is read), the batch
axes stay unflattened, and the result is reshaped (a view) to the 3-D shape its consumers
expect. A decode step's scores over the cache (one query row, Q @ K^T over a [P, D]
cache read along its contiguous head dim) get a kernel of their own, scheduled here
(rule `scores-tree`): the query heads of a group share each K row, and each score is
summed lane-wise and then by a tree of vector adds. Other rewritten matmuls are left to
the CPU rules (tvm_schedule).

Where a decode step's attention is plain, the entries emit it as one op instead, lowered
to one kernel (edgec.decode_attention, targets/tvm_attention); this rewrite serves the
layers that keep the matmuls (window masks, soft-capping, calibrated heads).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import tvm
import tvm_ffi
from tvm import relax, s_tir, te, tirx
from tvm.sym import Analyzer

from edgec.targets.tvm_schedule import RULE_ATTR

__all__ = ["SCORES_RULE", "VIEW_MATMUL_BLOCK", "read_views_in_place"]

VIEW_MATMUL_BLOCK = "view_matmul"
SCORES_RULE = "scores-tree"
# A score's head-dim product is summed lane-wise into this many lanes, then by a tree.
SCORE_LANES = 16

# index into a view -> index into the tensor it was taken of
_IndexMap = Callable[[Sequence[Any]], list[Any]]


def _compose(first: _IndexMap, then: _IndexMap) -> _IndexMap:
    return lambda index: then(first(index))


def _identity(index: Sequence[Any]) -> list[Any]:
    return list(index)


def _is_one(dim: Any) -> bool:
    return isinstance(dim, tirx.IntImm) and int(dim) == 1


def _is_float(expr: relax.Expr) -> bool:
    return str(getattr(expr.ty, "dtype", "")).startswith("float")


def _read(tensor: te.Tensor, index: Sequence[Any], dtype: str) -> Any:
    value = tensor[tuple(index)]
    return value if tensor.dtype == dtype else value.astype(dtype)


def _halved(stage: te.Tensor, half: int) -> te.Tensor:
    """Lanes [..., 2h] -> [..., h]: lane i plus lane i + h (one vector add)."""
    *outer, _ = stage.shape
    return te.compute((*outer, tirx.const(half, "int64")), lambda *at: stage[(*at[:-1], at[-1])] + stage[(*at[:-1], at[-1] + half)],
                      name=f"lanes{half}")


def _same(a: Any, b: Any) -> bool:
    """Equal dimensions, symbolic ones included (the importer writes both `s + 1` and `1 + s`)."""
    return bool(tvm_ffi.structural_equal(a, b)) or bool(Analyzer().can_prove_equal(a, b))


@relax.expr_functor.mutator
class _ViewMatmulRewriter(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.rewritten = 0
        self._ops = {name: tvm.ir.Op.get(f"relax.{name}")
                     for name in ("matmul", "reshape", "broadcast_to", "permute_dims", "expand_dims", "take", "strided_slice",
                                  "astype")}

    def _bound(self, expr: relax.Expr, op: str) -> relax.Call | None:
        bound = self.lookup_binding(expr) if isinstance(expr, relax.Var) else None
        return bound if isinstance(bound, relax.Call) and bound.op.same_as(self._ops[op]) else None

    def _peel(self, expr: relax.Expr) -> tuple[relax.Expr, _IndexMap, bool]:
        """The tensor `expr` is a chain of broadcast / transpose / inserted-axis views of,
        how an index into `expr` maps to one into it, and whether a broadcast was peeled."""
        index_map: _IndexMap = _identity
        broadcast = False
        while True:
            if (call := self._bound(expr, "broadcast_to")) is not None:
                source = [d for d in call.args[0].ty.shape.values]
                target = [d for d in call.ty.shape.values]
                lead = len(target) - len(source)
                expanded = [n for n, d in enumerate(source) if _is_one(d) and not _is_one(target[lead + n])]
                if any(not _is_one(d) and not _same(d, target[lead + n]) for n, d in enumerate(source)):
                    break  # a broadcast TVM could not prove shape-preserving: leave it

                def step(index: Sequence[Any], lead: int = lead, expanded: list[int] = expanded, rank: int = len(source)) -> list[Any]:
                    return [0 if n in expanded else index[lead + n] for n in range(rank)]

                broadcast = broadcast or bool(expanded) or lead > 0
            elif (call := self._bound(expr, "permute_dims")) is not None:
                rank = len(call.ty.shape.values)
                axes = list(range(rank))[::-1] if call.attrs.axes is None else [int(a) for a in call.attrs.axes]

                def step(index: Sequence[Any], axes: list[int] = axes) -> list[Any]:
                    source: list[Any] = [None] * len(axes)
                    for out_axis, source_axis in enumerate(axes):
                        source[source_axis] = index[out_axis]
                    return source

            elif (call := self._bound(expr, "expand_dims")) is not None:
                rank = len(call.ty.shape.values)
                inserted = {int(a) % rank for a in call.attrs.axis}

                def step(index: Sequence[Any], inserted: set[int] = inserted) -> list[Any]:
                    return [i for n, i in enumerate(index) if n not in inserted]

            elif (call := self._bound(expr, "take")) is not None and self._scalar_constant(call.args[1]) is not None:
                # x[c] along an axis (one layer of a stacked cache): that axis fixed at c.
                value = self._scalar_constant(call.args[1])
                axis = int(call.attrs.axis) % len(call.args[0].ty.shape.values)

                def step(index: Sequence[Any], axis: int = axis, value: int = value) -> list[Any]:
                    return [*index[:axis], value, *index[axis:]]

            elif (call := self._bound(expr, "strided_slice")) is not None and (begins := self._unit_slice(call)) is not None:
                # A unit-stride slice (one layer's heads of a ragged cache): offsets added.
                def step(index: Sequence[Any], begins: dict[int, int] = begins) -> list[Any]:
                    return [i + begins[n] if n in begins else i for n, i in enumerate(index)]

            elif (call := self._bound(expr, "astype")) is not None and _is_float(call.args[0]) and _is_float(call):
                # A cache kept in a narrower float (cache_dtype float16): converted as it is read.
                step = _identity

            else:
                break
            index_map = _compose(index_map, step)
            expr = call.args[0]
        return expr, index_map, broadcast

    def _scores(self, a_base: relax.Expr, a_map: _IndexMap, b_base: relax.Expr, b_map: _IndexMap, dims: list[Any],
                dtype: str) -> relax.Call | None:
        """A decode step's attention scores (one query row against a cache read along its
        contiguous last axis: Q @ K^T) as a kernel of its own, or None for another matmul.
        The reduction rule's kernel did, per score, 4 vector FMAs into 16 lanes and then 16
        serial scalar adds, once per query head of a group; here the group shares each K row,
        the head-dim product is summed lane-wise (plain vector multiplies and adds) and the
        lanes by a tree of halving vector adds."""
        *outer, rows, depth, cols = dims
        if not (_is_one(rows) and isinstance(depth, tirx.IntImm) and int(depth) % SCORE_LANES == 0
                and not isinstance(cols, tirx.IntImm)):
            return None
        probe = [tirx.Var(f"i{n}", "int64") for n in range(len(outer))]
        k, col = tirx.Var("k", "int64"), tirx.Var("col", "int64")
        read = b_map([*probe, k, col])
        if not (isinstance(read[-1], tirx.Var) and read[-1].same_as(k)):
            return None
        used = {v.name for index in read if not isinstance(index, int) for v in tirx.analysis.undefined_vars(index)}
        grouped = [n for n, var in enumerate(probe) if var.name not in used]
        if len(grouped) == len(outer):
            return None
        parts = int(depth) // SCORE_LANES
        widths = [SCORE_LANES >> n for n in range(1, SCORE_LANES.bit_length())]  # 8, 4, 2, 1
        stages = ["lanes", *(f"lanes{width}" for width in widths)]

        def kernel(a: te.Tensor, b: te.Tensor, dims: list[Any]) -> te.Tensor:
            *outer, rows, _, cols = dims
            lane_count = tirx.const(SCORE_LANES, "int64")

            def lanes(*at: Any) -> Any:
                *o, t, lane = at
                total = None
                for part in range(parts):
                    d = lane + part * SCORE_LANES
                    term = _read(a, a_map([*o, 0, d]), dtype) * _read(b, b_map([*o, d, t]), dtype)
                    total = term if total is None else total + term
                return total

            stage = te.compute((*outer, cols, lane_count), lanes, name="lanes")
            for width in widths:
                stage = _halved(stage, width)
            summed = stage
            return te.compute((*outer, rows, cols), lambda *at: summed[(*at[:-2], at[-1], 0)], name=VIEW_MATMUL_BLOCK)

        call = self.builder_.call_te(kernel, a_base, b_base, dims, primfunc_name_hint=VIEW_MATMUL_BLOCK)
        gvar = call.args[0]
        self.builder_.update_func(gvar, _scores_schedule(self.builder_.get()[gvar], grouped, stages))
        return call

    @staticmethod
    def _scalar_constant(expr: relax.Expr) -> int | None:
        if not isinstance(expr, tvm.ir.expr.Constant):
            return None
        value = expr.value.numpy()
        return int(value) if value.ndim == 0 and value.dtype.kind in "iu" else None

    @staticmethod
    def _unit_slice(call: relax.Call) -> dict[int, int] | None:
        """{axis: begin} of a strided_slice with constant, non-negative begins and unit strides
        (its arguments: x, axes, begin, end[, strides], each a tuple)."""
        rank = len(call.args[0].ty.shape.values)
        fields = [list(getattr(arg, "fields", [])) for arg in call.args[1:]]
        axes, begin = fields[0], fields[1]
        strides = fields[3] if len(fields) > 3 else [1] * len(axes)
        begins: dict[int, int] = {}
        for axis, start, stride in zip(axes, begin, strides):
            if not all(isinstance(v, (int, tirx.IntImm)) for v in (axis, start, stride)):
                return None
            if int(stride) != 1 or int(start) < 0:
                return None
            begins[int(axis) % rank] = int(start)
        return begins if len(begins) == len(axes) else None

    def _unflattened(self, operand: relax.Expr) -> tuple[relax.Expr, list[Any]] | None:
        """(the N-D tensor a 3-D operand reshapes, merging only its batch axes; its shape)."""
        shape = list(operand.ty.shape.values)
        call = self._bound(operand, "reshape")
        if call is None:
            return operand, shape
        source = list(call.args[0].ty.shape.values)
        if len(source) < 3 or not (_same(source[-1], shape[-1]) and _same(source[-2], shape[-2])):
            return None
        return call.args[0], source

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: N802 - TVM's visitor name
        call = super().visit_call_(call)
        if not (isinstance(call, relax.Call) and call.op.same_as(self._ops["matmul"])):
            return call
        lhs, rhs = call.args
        dtypes = {str(lhs.ty.dtype), str(rhs.ty.dtype), str(call.ty.dtype)}
        if len(dtypes) != 1 or lhs.ty.ndim != 3 or rhs.ty.ndim != 3:
            return call
        left, right = self._unflattened(lhs), self._unflattened(rhs)
        if left is None or right is None:
            return call
        (a_view, a_shape), (b_view, b_shape) = left, right
        batch = a_shape[:-2]
        if len(b_shape) != len(a_shape) or not all(_same(x, y) for x, y in zip(batch, b_shape[:-2])):
            return call
        a_base, a_map, a_broadcast = self._peel(a_view)
        b_base, b_map, b_broadcast = self._peel(b_view)
        if not (a_broadcast or b_broadcast):
            return call  # nothing was being copied
        # The dims go in as arguments: call_te gives the kernel its own copies of symbolic vars.
        dims = [*batch, a_shape[-2], a_shape[-1], b_shape[-1]]

        dtype = str(call.ty.dtype)
        scores = self._scores(a_base, a_map, b_base, b_map, dims, dtype)
        if scores is not None:
            self.rewritten += 1
            return relax.op.reshape(self.builder_.emit(scores), call.ty.shape)

        def view_matmul(a: te.Tensor, b: te.Tensor, dims: list[Any]) -> te.Tensor:
            *outer, rows, depth, cols = dims
            k = te.reduce_axis((0, depth), name="k")
            return te.compute(
                (*outer, rows, cols),
                lambda *at: te.sum(_read(a, a_map([*at[:-2], at[-2], k]), dtype) * _read(b, b_map([*at[:-2], k, at[-1]]), dtype),
                                   axis=k),
                name=VIEW_MATMUL_BLOCK,
            )

        self.rewritten += 1
        product = self.builder_.emit(self.builder_.call_te(view_matmul, a_base, b_base, dims, primfunc_name_hint=VIEW_MATMUL_BLOCK))
        return relax.op.reshape(product, call.ty.shape)


def _scores_schedule(func: tirx.PrimFunc, grouped: list[int], stages: list[str]) -> tirx.PrimFunc:
    """Parallel over the output's axes that pick a K row, then per position the query heads
    that share it (`grouped`, unrolled) innermost: each K row is loaded once for its group."""
    sch = s_tir.Schedule(func)
    loops = sch.get_loops(sch.get_sblock(VIEW_MATMUL_BLOCK))
    outer, rows, cols = loops[:-2], loops[-2], loops[-1]
    shared = [loop for n, loop in enumerate(outer) if n not in grouped]
    group = [outer[n] for n in grouped]
    sch.reorder(*shared, rows, cols, *group)
    row = sch.fuse(*shared) if len(shared) > 1 else shared[0]
    sch.parallel(row)
    inner = group[-1] if group else cols
    for name in reversed(stages):
        sch.compute_at(sch.get_sblock(name), inner, preserve_unit_loops=True)
    for name in stages:
        block = sch.get_sblock(name)
        sch.set_scope(block, 0, "global")  # a few lanes on the stack (see tvm_schedule)
        if name != stages[-1]:
            sch.vectorize(sch.get_loops(block)[-1])
    for loop in group:
        sch.unroll(loop)
    return sch.mod["main"].with_attr({"tirx.is_scheduled": True, RULE_ATTR: SCORES_RULE, "tirx.noalias": True})


def read_views_in_place(mod: tvm.IRModule) -> tuple[tvm.IRModule, int]:
    """`mod` with every batched matmul over broadcast views reading the viewed tensors
    directly, and how many matmuls were rewritten."""
    rewriter = _ViewMatmulRewriter(mod)
    rewritten = rewriter.visit_expr(mod["main"])
    out = rewriter.builder_.get()
    out["main"] = rewritten
    return relax.transform.DeadCodeElimination(["main"])(out), rewriter.rewritten
