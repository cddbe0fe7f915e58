"""TVM lowering of edgec's packed-weight ops (edgec.packing).

Before: torch.export keeps `edgec::qlinear` / `edgec::qembedding` as single nodes,
which TVM's importer does not know.
After: each becomes one TE PrimFunc whose first block decodes the packed codes and
whose second consumes them (a matmul, or a row gather), reading the packed tensors
transposed (see `_convert`). Both blocks live in one
function, so the CPU schedule's matmul rule inlines the decode into the matmul's
inner loop: the weight is read packed from memory on every call and no fp32 copy of
it exists, at build time, in params, or at run time. Packed planes are function
parameters, never bound constants, so FoldConstant cannot expand them either.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tvm import relax, te, tirx

from edgec.packing import INDEX_WIDTH, PLANE_WIDTHS, planes_of


def _field(plane: te.Tensor, width: int, row: Any, col: Any) -> Any:
    """Field `col` of row `row` of a transposed uint8 plane of `width`-bit fields, as int32."""
    per_byte = 8 // width
    shift = ((col % per_byte) * width).astype("uint8")
    return ((plane[col // per_byte, row] >> shift) & tirx.const((1 << width) - 1, "uint8")).astype("int32")


def _code(planes: list[te.Tensor], bits: int, row: Any, col: Any) -> Any:
    """The integer code of W[row, col] as int32, from its uint8 planes."""
    value: Any = None
    offset = 0
    for plane, width in zip(planes, PLANE_WIDTHS[bits]):
        part = _field(plane, width, row, col)
        if offset:
            part = part << tirx.const(offset, "int32")
        value = part if value is None else value | part
        offset += width
    return value


def _scaled(code: Any, scales: te.Tensor, zeros: te.Tensor | None, bits: int, group: int, dtype: str, row: Any, col: Any,
            lookup: Callable[[te.Tensor, Any, Any], Any] | None = None) -> Any:
    """The weight value of `code` at W[row, col] (col picks the group); float zeros are the
    offset grid's offsets (edgec.packing). `lookup(values, group, row)` reads a scale or
    zero where they are not stored transposed ([K / group, N], the default)."""
    at = lookup or (lambda values, g, r: values[g, r])
    if zeros is not None and "float" in str(zeros.dtype):
        scale = at(scales, col // group, row).astype(dtype)
        return code.astype(dtype) * scale + at(zeros, col // group, row).astype(dtype)
    if zeros is None:
        centred = (code - tirx.const(1 << (bits - 1), "int32")).astype(dtype)
    else:
        centred = (code - at(zeros, col // group, row).astype("int32")).astype(dtype)
    return centred * at(scales, col // group, row).astype(dtype)


def _weight(
    planes: list[te.Tensor], scales: te.Tensor, zeros: te.Tensor | None, bits: int, group: int, dtype: str, row: Any, col: Any
) -> Any:
    return _scaled(_code(planes, bits, row, col), scales, zeros, bits, group, dtype, row, col)


def _weight_nm(
    planes: list[te.Tensor], index: te.Tensor, scales: te.Tensor, zeros: te.Tensor | None,
    bits: int, group: int, keep: int, span: int, dtype: str, row: Any, col: Any,
) -> Any:
    """W[row, col] from N:M compressed codes: the kept code whose stored position in the
    M-block is col's, else exactly 0."""
    block = (col // span) * keep
    position = (col % span).astype("int32")
    value: Any = tirx.const(0.0, dtype)
    for slot in reversed(range(keep)):
        stored = block + slot
        kept = _scaled(_code(planes, bits, row, stored), scales, zeros, bits, group, dtype, row, col)
        value = tirx.Select(_field(index, INDEX_WIDTH[span], row, stored) == position, kept, value)
    return value


def qlinear_te(
    x: te.Tensor,
    plane0: te.Tensor,
    plane1: te.Tensor | None,
    scales: te.Tensor,
    zeros: te.Tensor | None,
    bias: te.Tensor | None,
    bits: int,
    group: int,
) -> te.Tensor:
    planes = planes_of(plane0, plane1)
    rows = plane0.shape[1]
    cols = x.shape[-1]
    dtype = x.dtype
    weight = te.compute(
        (rows, cols),
        lambda n, k: _weight(planes, scales, zeros, bits, group, dtype, n, k),
        name="dequantize",
    )
    return _matmul(x, weight, bias)


def _matmul(x: te.Tensor, weight: te.Tensor, bias: te.Tensor | None) -> te.Tensor:
    """y = x @ weight^T (+ bias), weight [N, K] computed by a decode block."""
    rows, cols = weight.shape
    k = te.reduce_axis((0, cols), name="k")
    lead = list(x.shape[:-1])

    def _out(*index: Any) -> Any:
        return te.sum(x[(*index[:-1], k)] * weight[index[-1], k], axis=k)

    return _with_bias(te.compute((*lead, rows), _out, name="matmul"), bias)


def _with_bias(out: te.Tensor, bias: te.Tensor | None) -> te.Tensor:
    if bias is None:
        return out
    return te.compute(out.shape, lambda *index: out[index] + bias[index[-1]].astype(out.dtype), name="bias_add")


def qlinear_nm_te(
    x: te.Tensor,
    plane0: te.Tensor,
    plane1: te.Tensor | None,
    index: te.Tensor,
    scales: te.Tensor,
    zeros: te.Tensor | None,
    bias: te.Tensor | None,
    bits: int,
    group: int,
    keep: int,
    span: int,
) -> te.Tensor:
    """qlinear_te with N:M compressed codes: the decode block expands them (the schedule
    decodes one panel per column tile), the matmul is dense."""
    planes = planes_of(plane0, plane1)
    dtype = x.dtype
    weight = te.compute(
        (plane0.shape[1], x.shape[-1]),
        lambda n, k: _weight_nm(planes, index, scales, zeros, bits, group, keep, span, dtype, n, k),
        name="dequantize",
    )
    return _matmul(x, weight, bias)


def qlinear_nm_gather_te(
    x: te.Tensor,
    plane0: te.Tensor,
    plane1: te.Tensor | None,
    index: te.Tensor,
    scales: te.Tensor,
    zeros: te.Tensor | None,
    bias: te.Tensor | None,
    bits: int,
    group: int,
    keep: int,
    span: int,
) -> te.Tensor:
    """The sparse kernel for N:M compressed codes: each output sums over the kept weights
    only (N of every M), gathering the input at each kept weight's position -- half the
    multiply-adds of the dense matmul at 2:4, at the cost of indirect loads."""
    planes = planes_of(plane0, plane1)
    dtype = x.dtype
    outputs = plane0.shape[1]
    kept = plane0.shape[0] * (8 // PLANE_WIDTHS[bits][0])
    j = te.reduce_axis((0, kept), name="j")
    lead = list(x.shape[:-1])

    def _out(*at: Any) -> Any:
        n = at[-1]
        col = (j.var.astype("int64") // keep) * span + _field(index, INDEX_WIDTH[span], n, j).astype("int64")
        weight = _scaled(_code(planes, bits, n, j), scales, zeros, bits, group, dtype, n, col)
        return te.sum(x[(*at[:-1], col)] * weight, axis=j)

    return _with_bias(te.compute((*lead, outputs), _out, name="sparse_matmul"), bias)


# N:M kernels by name: the schedule pass times both per workload and keeps the faster.
NM_KERNELS: dict[str, Callable[..., te.Tensor]] = {"decode": qlinear_nm_te, "sparse": qlinear_nm_gather_te}


def qembedding_te(
    ids: te.Tensor,
    plane0: te.Tensor,
    plane1: te.Tensor | None,
    scales: te.Tensor,
    zeros: te.Tensor | None,
    bits: int,
    group: int,
) -> te.Tensor:
    planes = planes_of(plane0, plane1)
    hidden = plane0.shape[0] * (8 // PLANE_WIDTHS[bits][0])

    def _row(*index: Any) -> Any:
        token = ids[index[:-1]].astype("int64")
        return _weight(planes, scales, zeros, bits, group, "float32", token, index[-1])

    return te.compute((*ids.shape, hidden), _row, name="embedding_decode")


def _convert(
    te_func: Callable[..., te.Tensor] | Callable[[Any], Callable[..., te.Tensor]], hint: str, packed_args: slice, by_node: bool = False
) -> Callable[[Any, Any], relax.Var]:
    """The kernels read planes, scales and zeros transposed ([K / per byte, N]): for one
    k, the codes of consecutive outputs n are consecutive bytes, so decoding a vector of
    outputs is one contiguous load. The transposes act on parameters only, so the build
    runs them once at compile time (LiftTransformParams); the bytes stay packed, and the
    tied embedding and lm_head transpose the same table, which is then stored once.
    `by_node`: te_func takes the torch.fx node and returns the kernel for it."""

    def convert(node: Any, importer: Any) -> relax.Var:
        builder = importer.block_builder
        args = list(importer.retrieve_args(node))
        for index in range(len(args))[packed_args]:
            if args[index] is not None:
                args[index] = builder.emit(relax.op.permute_dims(args[index], [1, 0]))
        kernel = te_func(node) if by_node else te_func
        return builder.emit_te(kernel, *args, primfunc_name_hint=hint)

    return convert


def nm_workload(node: Any) -> str:
    """The workload of a qlinear_nm node of an exported program: shapes and storage."""
    x, plane0, plane1, index, scales, zeros, bias, bits, group, keep, span = node.args
    outputs, inputs = int(plane0.meta["val"].shape[0]), int(x.meta["val"].shape[-1])
    parts = [f"{outputs}x{inputs}", f"{bits}bit", f"g{group}", f"{keep}:{span}", "asym" if zeros is not None else "sym"]
    return " ".join(parts + (["bias"] if bias is not None else []))


def nm_kernel_args(node: Any, rows: Any) -> tuple[list[te.Tensor], list[Any]]:
    """Placeholders shaped as the importer passes them (x with `rows` tokens, packed
    tensors transposed), and the op's integer attributes."""
    x, plane0, plane1, index, scales, zeros, bias, bits, group, keep, span = node.args

    def placeholder(arg: Any, name: str, transpose: bool) -> te.Tensor | None:
        if arg is None:
            return None
        value = arg.meta["val"]
        shape = [int(d) for d in value.shape]
        return te.placeholder(shape[::-1] if transpose else shape, str(value.dtype).removeprefix("torch."), name)

    lead = [1] * (len(x.meta["val"].shape) - 2)
    inputs = te.placeholder((*lead, rows, int(x.meta["val"].shape[-1])), "float32", "x")
    packed = [placeholder(a, n, True) for a, n in ((plane0, "plane0"), (plane1, "plane1"), (index, "index"), (scales, "scales"), (zeros, "zeros"))]
    return [inputs, *packed, placeholder(bias, "bias", False)], [bits, group, keep, span]


def convert_map(nm_kernels: dict[str, str] | None = None, dot: Any = None,
                fuse_linears: bool = True) -> dict[str, Callable[[Any, Any], relax.Var]]:
    """The custom converters; `nm_kernels` picks the kernel ("decode" or "sparse") per
    N:M workload (nm_workload), as the schedule pass measured; default decode. `dot`
    (a tvm_dot.DotIsa): int8 activations and integer dot products for the linears and
    embeddings that fit (targets/tvm_dot.py), linears of one input fused unless
    `fuse_linears` is False."""
    chosen = nm_kernels or {}
    converters = {
        # qlinear(x, plane0, plane1, scales, zeros, bias, bits, group)
        "qlinear.default": _convert(qlinear_te, "qlinear", slice(1, 5)),
        # qlinear_nm(x, plane0, plane1, index, scales, zeros, bias, bits, group, keep, span)
        "qlinear_nm.default": _convert(
            lambda node: NM_KERNELS[chosen.get(nm_workload(node), "decode")], "qlinear_nm", slice(1, 6), by_node=True
        ),
        # qembedding(ids, plane0, plane1, scales, zeros, bits, group)
        "qembedding.default": _convert(qembedding_te, "qembedding", slice(1, 5)),
    }
    if dot is None:
        return converters
    from edgec.targets.tvm_dot import dot_converters

    return dot_converters(dot, converters, fuse=fuse_linears)
