"""Integer dot-product kernels for 4- and 8-bit packed linears (int8 activations).

Before: a packed linear decodes every weight to float32 in the matmul's inner loop
(shift, mask, convert, scale, offset per weight); a decode step of SmolLM2 at 4 bits is
bound by that arithmetic (~7 GB/s of weights), not by memory.
After (`schedule.activations: int8`): the input rows are quantized to int8 per group of
`group` inputs (llama.cpp's Q8 activations: a float scale max|x|/127 and the sum of the
rounded group), and each group of each output is one integer dot product of its
codes with those int8 inputs -- AVX-512 VNNI `vpdpbusd` (64 byte products per
instruction) or Arm `sdot` -- then the group adds scale * x_scale * dot plus x_sum times
its offset (or times its zero point's share). Codes are never converted to float.
Measured on SmolLM2-135M at 4 bits (README, CPU latency): 2x the decode speed of the
float kernel, perplexity +0.5%.

Weight layout, chosen at compile time (the transform on parameters runs once, in
LiftTransformParams): tiles of `lanes` outputs (one int32 vector of accumulators),
`[N / lanes, K / 8, lanes * 4]` bytes at 4 bits and `[N / lanes, K / 4, lanes * 4]` at 8:
the 4 bytes of lane l hold 4 consecutive inputs of output l, as the instructions sum
them. At 4 bits the low nibbles hold inputs 0-3 of each 8 and the high nibbles inputs
4-7, so one load, a mask and a shift give two instructions' operands. Scales and zeros
are stored in the same tile order, `[N / lanes, K / group, lanes]` (`scale_tiles`). The
tied embedding reads the same tiles (`qembedding_tiles_te`), so the table is stored once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from tvm import te, tirx
from tvm.script import tirx as T
from tvm.target import Target
from tvm.target.codegen import llvm_get_cpu_features

from edgec.packing import PLANE_WIDTHS
from edgec.targets.tvm_schedule import RULE_ATTR, rule_calls

# Bit widths with a dot-product kernel: one plane of 4- or 8-bit fields.
DOT_BITS = (4, 8)
RULE = "int8-dot"
# How many linears one dot kernel computes (q, k and v reading one input: one kernel).
LINEARS_ATTR = "edgec.dot_linears"


@dataclasses.dataclass(frozen=True)
class DotIsa:
    """The target's integer dot product: `lanes` int32 accumulators per instruction, each
    summing 4 byte products. `signed_codes`: both operands are int8 (Arm sdot), so 8-bit
    codes are stored minus 128; x86's vpdpbusd multiplies unsigned codes by signed inputs."""

    name: str
    intrinsic: str
    lanes: int
    signed_codes: bool

    def code_bias(self, bits: int) -> int:
        return 128 if self.signed_codes and bits == 8 else 0


AVX512_VNNI = DotIsa("avx512-vnni", "llvm.x86.avx512.vpdpbusd.512", 16, signed_codes=False)
ARM_DOTPROD = DotIsa("neon-dotprod", "llvm.aarch64.neon.sdot.v4i32.v16i8", 4, signed_codes=True)


def dot_isa(target: Target) -> DotIsa | None:
    """The integer dot product `target` has, from its own features (not the host's)."""
    if target.kind.name != "llvm":
        return None
    features = {str(f) for f in llvm_get_cpu_features(target)}
    if str(target.attrs.get("mtriple", "")).startswith("aarch64"):
        return ARM_DOTPROD if "dotprod" in features else None
    return AVX512_VNNI if {"avx512vnni", "avx512bw"} <= features else None


def inputs_per_byte_row(bits: int) -> int:
    """Inputs of one output held by one 4-byte lane slot of a tile row."""
    return 8 if bits == 4 else 4


def fits(isa: DotIsa, bits: int, group: int, outputs: int, inputs: int) -> bool:
    """Whether a [outputs, inputs] linear at `bits` in groups of `group` has a dot kernel."""
    step = inputs_per_byte_row(bits)
    return bits in DOT_BITS and outputs % isa.lanes == 0 and group % step == 0 and inputs % group == 0


def _code(plane: te.Tensor, bits: int, n: Any, k: Any) -> Any:
    """Code of W[n, k] from its [N, K * bits / 8] plane (edgec.packing's field order), uint8."""
    if bits == 8:
        return plane[n, k]
    return (plane[n, k // 2] >> ((k % 2) * 4).astype("uint8")) & tirx.const(15, "uint8")


def tiles_te(plane: te.Tensor, bits: int, isa: DotIsa) -> te.Tensor:
    """The [N / lanes, K / step, lanes * 4] tile layout of a packed plane (module doc)."""
    outputs = plane.shape[0]
    inputs = plane.shape[1] * (8 // PLANE_WIDTHS[bits][0])
    step, lanes, bias = inputs_per_byte_row(bits), isa.lanes, isa.code_bias(bits)

    def _byte(tile: Any, row: Any, i: Any) -> Any:
        n = tile * lanes + i // 4
        k = row * step + i % 4
        if bits == 4:
            return _code(plane, 4, n, k) | (_code(plane, 4, n, k + 4) << tirx.const(4, "uint8"))
        return _code(plane, 8, n, k) - tirx.const(bias, "uint8")  # wraps: int8 bits of code - 128

    return te.compute((outputs // lanes, inputs // step, lanes * 4), _byte, name="dot_tiles")


def qlinear_dot_func(
    isa: DotIsa, bits: int, group: int, outputs: int, inputs: int, scale_dtype: str, zeros_dtype: str | None,
    linears: int = 1,
) -> tirx.PrimFunc:
    """y[R, N] = x[R, K] @ W^T from tiles (tiles_te) and the scales and zeros in tile order
    (`[N / lanes, K / group, lanes]`, scale_tiles; float zeros: the offset grid's offsets;
    None: symmetric, and the zeros parameter is never read -- pass the scales); R
    symbolic. Marked scheduled: it is its own schedule. At 4 bits the high nibbles hold
    inputs 4-7 of each 8 (tiles_te).

    With codes c stored minus b (DotIsa.code_bias), a group adds
    scale * (x_scale * dot + (b - zero) * x_sum), or on the offset grid (below 8 bits,
    b = 0) scale * x_scale * dot + offset * x_sum. `linears`: how many linears' tiles are
    concatenated along N (recorded for `dot_calls`).

    The body names no values: in this TVM a name assigned in TVMScript is a mutable local,
    lowered to a call to the workspace pool per parallel task (four pairs per tile when
    the row, offset and float terms were named: 3x the kernel's time on L2-resident weights)."""
    lanes, step = isa.lanes, inputs_per_byte_row(bits)
    tiles, rows_per_group, groups = outputs // lanes, group // step, inputs // group
    ivec, fvec, bvec = f"int32x{lanes}", f"float32x{lanes}", f"int8x{lanes * 4}"
    four_bit, offset_grid = bits == 4, zeros_dtype is not None and "float" in zeros_dtype
    symmetric_shift = float(isa.code_bias(bits) - (1 << (bits - 1)))
    bias = float(isa.code_bias(bits))
    vector, row_bytes = T.ramp(0, 1, lanes), T.ramp(0, 1, lanes * 4)

    def _dot(acc: Any, codes: Any, xq: Any, r: Any, k0: Any) -> Any:
        """acc + the 4-byte dot products of each lane's codes with xq[r, k0:k0+4]."""
        inputs4 = T.broadcast(T.reinterpret("int32", xq[r, T.ramp(k0, 1, 4)]), lanes)
        return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(isa.intrinsic), acc, T.reinterpret(bvec, codes),
                                       T.reinterpret(bvec, inputs4), dtype=ivec)

    def _group(dot: Any, scale: Any, zeros: Any, x_scale: Any, x_sum: Any) -> Any:
        """What one group adds to the outputs' accumulators (the grids: docstring above)."""
        scaled_dot = T.Cast(fvec, dot) * T.broadcast(x_scale, lanes)
        if offset_grid:
            return T.Cast(fvec, scale) * scaled_dot + T.Cast(fvec, zeros) * T.broadcast(x_sum, lanes)
        if zeros_dtype is None:
            return T.Cast(fvec, scale) * (scaled_dot + T.broadcast(T.float32(symmetric_shift) * x_sum, lanes))
        shift = T.broadcast(T.float32(bias), lanes) - T.Cast(fvec, zeros)
        return T.Cast(fvec, scale) * (scaled_dot + shift * T.broadcast(x_sum, lanes))

    @T.prim_func(private=True)
    def qlinear_dot(
        x_h: T.handle,
        w: T.Buffer((tiles, inputs // step, lanes * 4), "uint8"),
        scale: T.Buffer((tiles, groups, lanes), scale_dtype),
        zeros: T.Buffer((tiles, groups, lanes), zeros_dtype or scale_dtype),
        y_h: T.handle,
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, RULE_ATTR: RULE, LINEARS_ATTR: linears})
        rows = T.int64()
        x = T.match_buffer(x_h, (rows, inputs), "float32")
        y = T.match_buffer(y_h, (rows, outputs), "float32")
        xq = T.alloc_buffer((rows, inputs), "int8")
        x_scale = T.alloc_buffer((rows, groups), "float32")
        x_sum = T.alloc_buffer((rows, groups), "float32")
        # Quantize each row per group: cheap (K per row) and serial, before the parallel loop.
        for r, g in T.grid(rows, groups):
            peak = T.alloc_buffer((1,), "float32")
            total = T.alloc_buffer((1,), "int32")
            peak[0] = T.float32(0)
            total[0] = 0
            for k in range(group):
                peak[0] = T.max(peak[0], T.fabs(x[r, g * group + k]))
            x_scale[r, g] = peak[0] / T.float32(127)
            for k in range(group):
                xq[r, g * group + k] = T.Cast(
                    "int8",
                    T.nearbyint(x[r, g * group + k] * T.if_then_else(peak[0] > T.float32(0), T.float32(127) / peak[0], T.float32(0))),
                )
                total[0] = total[0] + T.Cast("int32", xq[r, g * group + k])
            # The sum of the rounded inputs, not of x: the group's error is then sum(w * e)
            # over rounding errors e, not sum(scale * code * e) with codes 0..15 off-centre
            # (4x the variance; measured on SmolLM2 at 4 bits: perplexity +1.7% with x's sum,
            # +0.5% with this one, against float activations).
            x_sum[r, g] = T.Cast("float32", total[0]) * x_scale[r, g]
        for tile in T.parallel(tiles):
            for r in range(rows):
                acc = T.alloc_buffer((lanes,), "float32")
                dot = T.alloc_buffer((lanes,), "int32")
                acc[vector] = T.broadcast(T.float32(0), lanes)
                for g in range(groups):
                    dot[vector] = T.broadcast(T.int32(0), lanes)
                    for q in range(rows_per_group):
                        if four_bit:
                            dot[vector] = _dot(dot[vector], w[tile, g * rows_per_group + q, row_bytes] & T.broadcast(T.uint8(15), lanes * 4),
                                               xq, r, g * group + q * step)
                            dot[vector] = _dot(dot[vector], w[tile, g * rows_per_group + q, row_bytes] >> T.broadcast(T.uint8(4), lanes * 4),
                                               xq, r, g * group + q * step + 4)
                        else:
                            dot[vector] = _dot(dot[vector], w[tile, g * rows_per_group + q, row_bytes], xq, r, g * group + q * step)
                    acc[vector] = acc[vector] + _group(dot[vector], scale[tile, g, vector], zeros[tile, g, vector], x_scale[r, g], x_sum[r, g])
                y[r, T.ramp(tile * lanes, 1, lanes)] = acc[vector]

    return qlinear_dot


def scale_tiles(builder: Any, values: Any, lanes: int) -> Any:
    """A linear's stored [N, K / group] scales (or zeros) in the dot kernel's tile order,
    [N / lanes, K / group, lanes]: a parallel task then reads its tiles' scales as one
    stream, where the transposed [K / group, N] put each group's 16 values a row of N
    apart (measured on SmolLM2's tied lm_head, 49152 x 576: 947 -> 777 us a call with
    cold caches). A weight transform, done once at compile time."""
    from tvm import relax

    outputs, groups = (int(d) for d in values.ty.shape.values)
    tiled = builder.emit(relax.op.reshape(values, [outputs // lanes, lanes, groups]))
    return builder.emit(relax.op.permute_dims(tiled, [0, 2, 1]))


def qembedding_tiles_te(ids: te.Tensor, tiles: te.Tensor, scales: te.Tensor, zeros: te.Tensor | None, bits: int,
                        group: int, isa: DotIsa) -> te.Tensor:
    """Rows of the table from its dot tiles and tile-order scales and zeros (scale_tiles):
    the tied lm_head's layout, so the table is stored once."""
    from edgec.targets.tvm_packed import _scaled

    lanes, step, bias = isa.lanes, inputs_per_byte_row(bits), isa.code_bias(bits)
    hidden = tiles.shape[1] * step

    def _row(*index: Any) -> Any:
        n = ids[index[:-1]].astype("int64")
        k = index[-1]
        byte = tiles[n // lanes, k // step, (n % lanes) * 4 + k % 4]
        if bits == 4:
            code = ((byte >> ((k % 8) // 4 * 4).astype("uint8")) & tirx.const(15, "uint8")).astype("int32")
        else:
            stored = tirx.reinterpret("int8", byte) if bias else byte
            code = stored.astype("int32") + tirx.const(bias, "int32")
        return _scaled(code, scales, zeros, bits, group, "float32", n, k,
                       lookup=lambda values, g, row: values[row // lanes, g, row % lanes])

    return te.compute((*ids.shape, hidden), _row, name="embedding_decode")


def dot_calls(mod: Any) -> tuple[int, int]:
    """(linears, kernel calls) of a Relax module's main on dot kernels: a fused kernel
    is one call computing several linears."""
    called = rule_calls(mod, RULE)
    return sum(int(func.attrs.get(LINEARS_ATTR, 1)) for func in called), len(called)


def _shape(node_arg: Any) -> list[int]:
    return [int(d) for d in node_arg.meta["val"].shape]


def _linear_kind(node: Any, isa: DotIsa) -> tuple[Any, ...] | None:
    """What must match for linears to share one dot kernel (input, bits, group, grid,
    dtypes), or None where this qlinear node has no dot kernel (`fits`)."""
    x, plane0, plane1, scales, zeros, _bias, bits, group = node.args
    outputs, inputs = _shape(plane0)[0], _shape(x)[-1]
    if plane1 is not None or str(x.meta["val"].dtype) != "torch.float32" or not fits(isa, bits, group, outputs, inputs):
        return None
    zeros_dtype = None if zeros is None else str(zeros.meta["val"].dtype)
    return (x, bits, group, inputs, str(scales.meta["val"].dtype), zeros_dtype)


def dot_converters(isa: DotIsa, fallback: dict[str, Callable[[Any, Any], Any]],
                   fuse: bool = True) -> dict[str, Callable[[Any, Any], Any]]:
    """qlinear / qembedding converters that use the dot kernel and tiles where the layer
    fits (`fits`), else `fallback`'s float kernels; an embedding uses the tiles whenever
    its table fits, so a tied lm_head and embedding read one stored table.

    With `fuse`, the linears that read one input with one grid (q, k, v; gate, up) are
    one kernel over their concatenated tiles: the input is quantized once and the thread
    pool starts once (decode: 121 kernels a SmolLM2 step instead of 211); each linear's
    output is a slice of the kernel's (a copy of one token's values at decode, run
    serial: tvm_schedule.touches_few_elements). The concatenation is a
    weight transform, done once at compile time; entries that share stored weights
    with others (`--subnet all`) would redo it per call, so they pass fuse=False."""
    from tvm import relax

    done: dict[Any, Any] = {}  # later linears of a fused kernel -> their output

    def qlinear(node: Any, importer: Any) -> Any:
        if node in done:
            return done.pop(node)
        kind = _linear_kind(node, isa)
        if kind is None:
            return fallback["qlinear.default"](node, importer)
        members = [node]
        if fuse:
            members += [user for user in node.args[0].users
                        if user is not node and user.target == node.target and _linear_kind(user, isa) == kind]
        builder = importer.block_builder
        _, bits, group, inputs, _, _ = kind
        args = [importer.retrieve_args(member)[:6] for member in members]
        scale_dtype = str(args[0][3].ty.dtype)
        zeros_dtype = None if args[0][4] is None else str(args[0][4].ty.dtype)
        widths = [_shape(member.args[1])[0] for member in members]

        def _joined(values: list[Any], axis: int) -> Any:
            return values[0] if len(values) == 1 else builder.emit(relax.op.concat(values, axis=axis))

        tiles = _joined([builder.emit_te(lambda plane: tiles_te(plane, bits, isa), a[1], primfunc_name_hint="dot_tiles")
                         for a in args], 0)
        scales_t = _joined([scale_tiles(builder, a[3], isa.lanes) for a in args], 0)
        zeros_t = scales_t if zeros_dtype is None else _joined([scale_tiles(builder, a[4], isa.lanes) for a in args], 0)
        x_v = args[0][0]
        lead = list(x_v.ty.shape.values)[:-1]
        rows = lead[0]
        for size in lead[1:]:
            rows = rows * size
        flat = builder.emit(relax.op.reshape(x_v, [rows, inputs]))
        total = sum(widths)
        kernel = qlinear_dot_func(isa, bits, group, total, inputs, scale_dtype, zeros_dtype, linears=len(members))
        out = builder.emit(relax.call_tir(builder.add_func(kernel, "qlinear_dot"), [flat, tiles, scales_t, zeros_t],
                                          relax.TensorType([rows, total], "float32")))
        begin = 0
        for member, width, (_, _, _, _, _, bias_v) in zip(members, widths, args):
            part = out if len(members) == 1 else builder.emit(
                relax.op.strided_slice(out, axes=[1], begin=[begin], end=[begin + width]))
            part = builder.emit(relax.op.reshape(part, [*lead, width]))
            done[member] = part if bias_v is None else builder.emit(relax.op.add(part, bias_v))
            begin += width
        return done.pop(node)

    def qembedding(node: Any, importer: Any) -> Any:
        _ids, plane0, plane1, _scales, _zeros, bits, group = node.args
        rows, hidden = _shape(plane0)[0], _shape(plane0)[1] * (8 // PLANE_WIDTHS[bits][0])
        if plane1 is not None or not fits(isa, bits, group, rows, hidden):
            return fallback["qembedding.default"](node, importer)
        builder = importer.block_builder
        ids_v, plane_v, _, scales_v, zeros_v = importer.retrieve_args(node)[:5]
        tiles = builder.emit_te(lambda plane: tiles_te(plane, bits, isa), plane_v, primfunc_name_hint="dot_tiles")
        scales_t = scale_tiles(builder, scales_v, isa.lanes)
        zeros_t = None if zeros_v is None else scale_tiles(builder, zeros_v, isa.lanes)
        return builder.emit_te(lambda *args: qembedding_tiles_te(*args, bits, group, isa), ids_v, tiles, scales_t, zeros_t,
                               primfunc_name_hint="qembedding")

    return {**fallback, "qlinear.default": qlinear, "qembedding.default": qembedding}
