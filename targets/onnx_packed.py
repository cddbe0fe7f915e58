"""ONNX lowering of edgec's packed-weight ops (edgec.packing) for the dynamo exporter.

- `edgec::qlinear` at 2 or 4 bits -> one com.microsoft MatMulNBits: its B input is
  our [N, K * bits / 8] planes reshaped to [N, K / group, group * bits / 8] (the same
  bytes), scales cast to the activation dtype, uint8 zero points packed per row. On the
  offset grid, MatMulNBits without zero points plus a small matmul of the inputs' group
  sums with the offsets (see qlinear_onnx).
- `edgec::qlinear` at 3 bits (MatMulNBits has no 3-bit kernel), 8 bits (see
  MATMUL_NBITS_BITS), or in groups that are not a power of two >= 16 (its CPU kernel's
  only block sizes) -> the planes decoded
  with standard ops, then MatMul. The file stays 3-bit; ONNX Runtime folds the decode
  when the session loads, so in memory that weight is fp32 (the compile report says so).
- `edgec::qembedding` -> Gather of the packed rows, then the same standard-op decode.
- A ragged last group (K not a multiple of the group): MatMulNBits takes K = x's width
  and ceil(K / group) blocks, its own rule for a short last block; the decode route
  slices the padded columns off.

onnx 1.23 ships no schema for com.microsoft ops and onnxscript needs one to trace a
call, so MATMUL_NBITS carries a local schema (nothing is registered globally).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxscript
from onnx import numpy_helper
from onnx.defs import OpSchema
from onnxscript import opset18 as op

from edgec.packing import PLANE_WIDTHS, planes_of

# Not 8: ORT 1.32's 8-bit MatMulNBits CPU kernel is fast only computing in int8
# (accuracy_level 4, activations quantized per block); in fp32 it runs a reference path:
# SmolLM2's 8-bit lm_head took 115 ms a decode row against 1 ms in int8.
MATMUL_NBITS_BITS = (2, 4)


def _matmul_nbits_op() -> onnxscript.values.Op:
    param = OpSchema.FormalParameter
    optional = OpSchema.FormalParameterOption.Optional
    attributes = [OpSchema.Attribute(name, OpSchema.AttrType.INT, "", required=True) for name in ("K", "N", "bits", "block_size")]
    schema = OpSchema(
        "MatMulNBits",
        "com.microsoft",
        1,
        inputs=[param("A", "T1"), param("B", "T2"), param("scales", "T1"), param("zero_points", "T3", param_option=optional)],
        outputs=[param("Y", "T1")],
        type_constraints=[
            ("T1", ["tensor(float)", "tensor(float16)"], ""),
            ("T2", ["tensor(uint8)"], ""),
            ("T3", ["tensor(uint8)", "tensor(float)", "tensor(float16)"], ""),
        ],
        attributes=attributes,
    )
    return onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "MatMulNBits", schema)


MATMUL_NBITS = _matmul_nbits_op()


def _ints(values: list[int]) -> Any:
    return op.Constant(value_ints=values)


def _typed(value: Any, dtype: type) -> Any:
    return op.Constant(value=numpy_helper.from_array(np.asarray(value, dtype=dtype)))


def _uint8(value: Any) -> Any:
    return _typed(value, np.uint8)


def _decode(planes: list[Any], scales: Any, zeros: Any, bits: int, group: int, like: Any, offset_grid: bool) -> Any:
    """Packed rows [..., K * w / 8] -> weights [..., K] in the dtype of `like`;
    `offset_grid`: `zeros` holds float offsets (edgec.packing). Passed in, not read from
    `zeros` here: a gathered value (qembedding's rows) has no dtype yet while tracing."""
    codes: Any = None
    offset = 0
    lead = op.Shape(planes[0], end=-1)
    for plane, width in zip(planes, PLANE_WIDTHS[bits]):
        per_byte = 8 // width
        shifted = op.BitShift(op.Unsqueeze(plane, _ints([-1])), _uint8(np.arange(per_byte) * width), direction="RIGHT")
        part = op.BitwiseAnd(shifted, _uint8((1 << width) - 1))
        part = op.Cast(op.Reshape(part, op.Concat(lead, _ints([-1]), axis=0)), to=6)  # int32
        if offset:
            part = op.BitShift(op.Cast(part, to=12), _typed(offset, np.uint32), direction="LEFT")  # uint32
            part = op.Cast(part, to=6)
        codes = part if codes is None else op.BitwiseOr(codes, part)
        offset += width
    grouped = op.Reshape(codes, op.Concat(lead, _ints([-1, group]), axis=0))
    scale = op.Unsqueeze(op.CastLike(scales, like), _ints([-1]))
    if offset_grid:
        weights = op.Add(op.Mul(op.CastLike(grouped, like), scale), op.Unsqueeze(op.CastLike(zeros, like), _ints([-1])))
        return op.Reshape(weights, op.Concat(lead, _ints([-1]), axis=0))
    if zeros is None:
        centred = op.Sub(grouped, _typed(1 << (bits - 1), np.int32))
    else:
        centred = op.Sub(grouped, op.Unsqueeze(op.Cast(zeros, to=6), _ints([-1])))
    weights = op.Mul(op.CastLike(centred, like), scale)
    return op.Reshape(weights, op.Concat(lead, _ints([-1]), axis=0))


def _is_offset(zeros: Any) -> bool:
    """Float zeros are the offset grid's offsets (traced values carry their ONNX dtype)."""
    return zeros is not None and zeros.dtype is not None and zeros.dtype.is_floating_point()


def _packed_zero_points(zeros: Any, rows: int, blocks: int, bits: int) -> Any:
    """uint8 [N, blocks] -> MatMulNBits' zero points: per row, `8 / bits` to a byte, low bits first."""
    if bits == 8:
        return zeros
    per_byte = 8 // bits
    pad = (-blocks) % per_byte
    padded = op.Pad(zeros, _ints([0, 0, 0, pad])) if pad else zeros
    split = op.Reshape(padded, _ints([rows, (blocks + pad) // per_byte, per_byte]))
    shifted = op.BitShift(split, _uint8(np.arange(per_byte) * bits), direction="LEFT")
    packed = op.ReduceSum(op.Cast(shifted, to=6), _ints([-1]), keepdims=0)  # disjoint bits: sum == or
    return op.Reshape(op.Cast(packed, to=2), _ints([-1]))


def qlinear_onnx(x: Any, plane0: Any, plane1: Any, scales: Any, zeros: Any, bias: Any, bits: int, group: int) -> Any:
    rows = int(plane0.shape[0])
    stored = int(plane0.shape[1]) * 8 // PLANE_WIDTHS[bits][0]
    # K is x's width; the codes are stored for whole groups (a ragged last group is padded).
    cols = int(x.shape[-1])
    if runs_as_matmul_nbits(bits, group):
        blocks = stored // group
        packed = op.Reshape(plane0, _ints([rows, blocks, group * bits // 8]))
        attributes = {"K": cols, "N": rows, "bits": bits, "block_size": group}
        scale = op.CastLike(scales, x)
        if zeros is None:
            out = MATMUL_NBITS(x, packed, scale, **attributes)
        elif _is_offset(zeros):
            # MatMulNBits' float zero points take a slow path (a SmolLM2 linear: 1.0 ms a
            # decode row against 0.05 ms with uint8 ones), so W = code * scale + offset is
            # split into its default kernel, (code - 2^(bits-1)) * scale, plus the inputs'
            # sums per group times (offset + 2^(bits-1) * scale): a [K / group, N] matmul.
            out = MATMUL_NBITS(x, packed, scale, **attributes)
            sums = op.ReduceSum(op.Reshape(x, op.Concat(op.Shape(x, end=-1), _ints([blocks, group]), axis=0)), _ints([-1]), keepdims=0)
            shifted = op.Add(op.CastLike(zeros, x), op.Mul(scale, op.CastLike(_typed(1 << (bits - 1), np.float32), x)))
            out = op.Add(out, op.MatMul(sums, op.Transpose(shifted, perm=[1, 0])))
        else:
            out = MATMUL_NBITS(x, packed, scale, _packed_zero_points(zeros, rows, blocks, bits), **attributes)
    else:
        planes = planes_of(plane0, plane1)
        weight = _decode(planes, scales, zeros, bits, group, x, _is_offset(zeros))
        if cols != stored:
            weight = op.Slice(weight, _ints([0]), _ints([cols]), _ints([1]))
        out = op.MatMul(x, op.Transpose(weight, perm=[1, 0]))
    return out if bias is None else op.Add(out, op.CastLike(bias, x))


def qembedding_onnx(ids: Any, plane0: Any, plane1: Any, scales: Any, zeros: Any, bits: int, group: int) -> Any:
    planes = [op.Gather(plane, ids, axis=0) for plane in planes_of(plane0, plane1)]
    rows_zeros = None if zeros is None else op.Gather(zeros, ids, axis=0)
    like = op.Constant(value=numpy_helper.from_array(np.zeros((), dtype=np.float32)))
    return _decode(planes, op.Gather(scales, ids, axis=0), rows_zeros, bits, group, like, _is_offset(zeros))


def translation_table() -> dict[Any, Any]:
    import torch

    import edgec.packing  # noqa: F401  (registers torch.ops.edgec)

    return {
        torch.ops.edgec.qlinear.default: qlinear_onnx,
        torch.ops.edgec.qembedding.default: qembedding_onnx,
    }


def runs_as_matmul_nbits(bits: int, group: int) -> bool:
    """MatMulNBits' CPU kernel, in fp32, at 2 and 4 bits in blocks of a power of two >= 16."""
    return bits in MATMUL_NBITS_BITS and group >= 16 and group & (group - 1) == 0


def lowering_note(bits: int, group: int) -> str:
    if runs_as_matmul_nbits(bits, group):
        return f"{bits}-bit: MatMulNBits (packed in the file and in memory)"
    why = "" if bits not in MATMUL_NBITS_BITS else f" (MatMulNBits takes groups of a power of two >= 16, not {group})"
    if bits == 8:
        why = " (ONNX Runtime's 8-bit MatMulNBits computes fast only in int8; in fp32 it is ~100x slower)"
    return f"{bits}-bit: packed in the file, decoded by standard ops that ONNX Runtime folds to fp32 at load{why}"
