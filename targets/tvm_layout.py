"""Weight layouts chosen at compile time: linear weights stored as column panels.

A Linear's matmul reads its weight as B[k, n]. The CPU matmul rule (tvm_schedule)
computes a register tile of `width` output columns over the whole k loop, so it reads
`width` floats from each of the K rows of B: a strided walk that touches a new page
every few rows for wide layers (the lm_head's rows are 196 KB apart), and the decode
step, which is nothing but such walks, ran at 1-10 GB/s.

`use_panel_weights` rewrites every `matmul(x, permute_dims(W))` and `matmul(x, W)` over
a float32 weight parameter into a matmul over `layout_transform(W)`, a
[N / width, K, width] tensor: the panel a tile reads is contiguous. The transform
reads only a parameter, so `LiftTransformParams` runs it once at compile time and
params.safetensors stores the panels (same bytes, no copy per call). `width` is the
matmul rule's tile width for the target (32 floats with AVX-512, 16 with AVX2, 8 with
NEON), so one panel is exactly one tile's columns.
"""

from __future__ import annotations

from typing import Any

import tvm
from tvm import relax, te, tirx
from tvm.target import Target

from edgec.targets.tvm_schedule import PANEL_MATMUL_BLOCK, CpuScheduleConfig

__all__ = ["panel_width", "use_panel_weights"]


def panel_width(target: Target) -> int:
    """Columns per panel: the matmul rule's register tile width for float32 on `target`."""
    config = CpuScheduleConfig.from_target(target)
    return config.tile_vectors * config.lanes("float32")


def _panel_matmul_te(x: te.Tensor, panels: te.Tensor) -> te.Tensor:
    """x @ W with W as [groups, K, width] panels: a matmul batched over the panels (so the
    CPU matmul rule tiles each panel as one column tile, and pads symbolic rows as for any
    matmul), then the panels' columns laid side by side again (an epilogue per tile)."""
    groups, depth, width = (int(d) for d in panels.shape)
    k = te.reduce_axis((0, depth), name="k")
    *lead, _ = x.shape
    per_panel = te.compute(
        (groups, *lead, width),
        lambda g, *at: te.sum(x[(*at[:-1], k)] * panels[g, k, at[-1]], axis=k),
        name=PANEL_MATMUL_BLOCK,
    )
    return te.compute(
        (*lead, groups * width), lambda *at: per_panel[(at[-1] // width, *at[:-1], at[-1] % width)], name="panel_columns"
    )


@relax.expr_functor.mutator
class _PanelRewriter(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, weights: set[relax.Var], width: int) -> None:
        super().__init__(mod)
        self.weights = weights
        self.width = width
        self.rewritten = 0
        self._matmul = tvm.ir.Op.get("relax.matmul")
        self._permute = tvm.ir.Op.get("relax.permute_dims")

    def _is_weight_kn(self, expr: relax.Expr) -> bool:
        """Whether `expr` is a [K, N] view of a 2-D weight parameter: the Linear's transpose
        of one, or the parameter itself."""
        if expr in self.weights:
            return True
        bound = self.lookup_binding(expr) if isinstance(expr, relax.Var) else None
        if not (isinstance(bound, relax.Call) and bound.op.same_as(self._permute)):
            return False
        axes = bound.attrs.axes
        return bound.args[0] in self.weights and (axes is None or [int(a) for a in axes] == [1, 0])

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: N802 - TVM's visitor name
        call = super().visit_call_(call)
        if not (isinstance(call, relax.Call) and call.op.same_as(self._matmul)):
            return call
        x, weight = call.args
        if not self._is_weight_kn(weight) or str(call.attrs.out_dtype) not in ("", "float32"):
            return call
        if str(x.ty.dtype) != "float32" or str(weight.ty.dtype) != "float32":
            return call  # float16 builds: ToMixedPrecision's casts sit between
        shape = list(weight.ty.shape.values)
        if len(shape) != 2 or not all(isinstance(d, tirx.IntImm) for d in shape):
            return call
        # A weight no wider than one panel is already one; a ragged last panel would need padding.
        cols = int(shape[1])
        if cols % self.width != 0 or cols == self.width:
            return call
        width = self.width
        panels = self.builder_.emit(
            relax.op.layout_transform(weight, index_map=lambda k, n: (n // width, k, n % width)), "panels"
        )
        self.rewritten += 1
        return self.builder_.call_te(_panel_matmul_te, x, panels, primfunc_name_hint="panel_matmul")


def use_panel_weights(mod: tvm.IRModule, num_inputs: int, width: int) -> tuple[tvm.IRModule, int]:
    """`mod` with every float32 Linear weight read as [N / width, K, width] panels, and how
    many matmuls were rewritten. Weights whose N is not a multiple of `width` keep [K, N]."""
    func = mod["main"]
    rewriter = _PanelRewriter(mod, set(func.params[num_inputs:]), width)
    rewritten = rewriter.visit_expr(func)
    out = rewriter.builder_.get()
    out["main"] = rewritten
    return relax.transform.DeadCodeElimination(["main"])(out), rewriter.rewritten
