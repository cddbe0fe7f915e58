"""Packed low-bit weights: the storage format, group quantizers, and the torch ops that use it.

One quantized matrix W[N, K] (N outputs, K inputs, the nn.Linear layout) is stored as:

- planes: uint8 [N, K * w / 8] for each plane width w of PLANE_WIDTHS[bits]. Code k of
  row n sits in byte k // (8 / w) at bit (k % (8 / w)) * w, low bits first. 3-bit codes
  are a 2-bit plane plus a 1-bit plane (code = plane0 | plane1 << 2), so every width
  costs exactly `bits` bits per weight.
- scales: float16 [N, ceil(K / group)].
- zeros: uint8 [N, ceil(K / group)] (asymmetric), or none (symmetric: zero point 2^(bits-1)),
  or float16 offsets [N, ceil(K / group)] (the offset grid).

A K that `group` does not divide (688 inputs in groups of 32) gets a ragged last group:
the codes are stored for K rounded up to whole groups, the tail holding the zero code, so
it decodes to 0 and every kernel may read it; the ops take K from their input (x's last
axis), as ONNX Runtime's MatMulNBits and llama.cpp treat a short last block.

W[n, k] = (code[n, k] - zero[n, k // group]) * scale[n, k // group]. A pruned weight is
code == zero, so it decodes to exactly 0.

The offset grid (llama.cpp's Q4_1, AWQ's and MLX's affine groups) spans each group's own
range: W[n, k] = code[n, k] * scale[n, k // group] + offset[n, k // group], the offset
the group's minimum in float16. 0 need not lie on it, so it is for unpruned weights; on
weights that came from such a format it re-quantizes them without loss, where an integer
zero point moves the grid by up to half a step.

N:M compressed (e.g. 2:4, when every M consecutive inputs of a row hold at most N
nonzero codes): the planes hold only N codes of each M ([N, K * N / M] codes), and an
index plane [N, K * N / M] of INDEX_WIDTH[M] bits holds each kept code's position in
its M-block (ascending). The other positions decode to exactly 0. At 4 bits, 2:4 costs
(4 + 2) / 2 = 3 bits per weight instead of 4.

Rows packed along K are also the embedding table layout (a tied lm_head shares the
embedding's planes) and ONNX Runtime's MatMulNBits layout. The ops `edgec::qlinear` and
`edgec::qembedding` keep a packed weight as one node through torch.export, so each
backend lowers it with its own kernel instead of seeing a decoded fp32 matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

T = TypeVar("T")

PLANE_WIDTHS: dict[int, tuple[int, ...]] = {8: (8,), 4: (4,), 3: (2, 1), 2: (2,)}
SUPPORTED_BITS: tuple[int, ...] = tuple(sorted(PLANE_WIDTHS, reverse=True))
# Bits of an N:M position index: the block sizes whose positions fill a plane width exactly.
INDEX_WIDTH: dict[int, int] = {2: 1, 4: 2, 16: 4}


@dataclass
class PackedWeight:
    planes: list[torch.Tensor]
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group: int
    # N:M compressed storage: the position plane, and (N, M); None / (0, 0) when dense.
    index: torch.Tensor | None = None
    keep: int = 0
    span: int = 0
    # The real input width when the last group is ragged (0: the stored width).
    cols: int = 0

    @property
    def stored_shape(self) -> tuple[int, int]:
        """(N, K rounded up to whole groups): the width the codes are stored for."""
        rows, packed = self.planes[0].shape
        stored = packed * 8 // PLANE_WIDTHS[self.bits][0]
        return rows, stored * self.span // self.keep if self.index is not None else stored

    @property
    def shape(self) -> tuple[int, int]:
        rows, stored = self.stored_shape
        return rows, self.cols or stored

    def nbytes(self) -> int:
        tensors = [*self.planes, self.scales] + [t for t in (self.zeros, self.index) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


def pack_plane(values: torch.Tensor, width: int) -> torch.Tensor:
    """Integers [N, K] in [0, 2^width) -> uint8 [N, K * width / 8], low bits first."""
    rows, cols = values.shape
    per_byte = 8 // width
    part = values.to(torch.int32).reshape(rows, cols // per_byte, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.int32) * width
    return (part << shifts).sum(dim=-1).to(torch.uint8)


def unpack_plane(plane: torch.Tensor, width: int) -> torch.Tensor:
    """The inverse of pack_plane over the last axis: int32."""
    per_byte = 8 // width
    shifts = torch.arange(per_byte, dtype=torch.int32) * width
    part = (plane.to(torch.int32)[..., None] >> shifts) & ((1 << width) - 1)
    return part.reshape(*plane.shape[:-1], plane.shape[-1] * per_byte)


def pack_codes(codes: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """Integer codes [N, K] in [0, 2^bits) -> one uint8 plane per width of PLANE_WIDTHS[bits]."""
    planes: list[torch.Tensor] = []
    offset = 0
    for width in PLANE_WIDTHS[bits]:
        planes.append(pack_plane((codes.to(torch.int32) >> offset) & ((1 << width) - 1), width))
        offset += width
    return planes


def unpack_codes(planes: list[torch.Tensor], bits: int) -> torch.Tensor:
    """The inverse of pack_codes over the last axis (works on gathered rows too): int32 codes."""
    codes: torch.Tensor | None = None
    offset = 0
    for plane, width in zip(planes, PLANE_WIDTHS[bits]):
        part = unpack_plane(plane, width) << offset
        codes = part if codes is None else codes | part
        offset += width
    assert codes is not None
    return codes


def is_offset(zeros: torch.Tensor | None) -> bool:
    """Whether `zeros` holds the offset grid's float offsets, not integer zero points."""
    return zeros is not None and zeros.is_floating_point()


def zero_codes(zeros: torch.Tensor | None, bits: int, group: int, shape: tuple[int, int]) -> torch.Tensor:
    """The code of 0.0 for every weight [N, K] (int32)."""
    if is_offset(zeros):
        raise ValueError("the offset grid has no code of 0.0: it is for unpruned weights")
    if zeros is None:
        return torch.full(shape, 1 << (bits - 1), dtype=torch.int32)
    return zeros.to(torch.int32).repeat_interleave(group, dim=1)


def compress_nm(packed: PackedWeight, keep: int, span: int) -> PackedWeight | None:
    """N:M compressed storage of a dense PackedWeight, or None where it does not apply:
    a block with more than `keep` nonzero codes, an M without an index width, or a width
    the kept codes do not fill whole bytes of."""
    rows, cols = packed.shape
    # A ragged tail would put kept positions past K, where the gather kernel reads x.
    if packed.index is not None or span not in INDEX_WIDTH or cols % span or cols != packed.stored_shape[1]:
        return None
    if is_offset(packed.zeros):
        return None
    kept = cols // span * keep
    if any(kept % (8 // width) for width in (*PLANE_WIDTHS[packed.bits], INDEX_WIDTH[span])):
        return None
    codes = unpack_codes(packed.planes, packed.bits).reshape(rows, cols // span, span)
    nonzero = codes != zero_codes(packed.zeros, packed.bits, packed.group, (rows, cols)).reshape(codes.shape)
    if int(nonzero.sum(-1).max()) > keep:
        return None
    # The nonzero positions first, then zero ones to fill each block to `keep`; ascending.
    order = torch.sort((~nonzero).to(torch.int8), dim=-1, stable=True).indices[..., :keep]
    positions = torch.sort(order, dim=-1).values
    kept_codes = torch.gather(codes, -1, positions).reshape(rows, kept)
    index = pack_plane(positions.reshape(rows, kept), INDEX_WIDTH[span])
    return PackedWeight(pack_codes(kept_codes, packed.bits), packed.scales, packed.zeros, packed.bits, packed.group, index, keep, span)


def expand_nm(kept_codes: torch.Tensor, index: torch.Tensor, keep: int, span: int, zero: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] from kept codes and their packed positions; `zero` [N, K] fills the rest."""
    rows, kept = kept_codes.shape
    positions = unpack_plane(index, INDEX_WIDTH[span]).reshape(rows, kept // keep, keep).to(torch.int64)
    codes = zero.clone().reshape(rows, kept // keep, span)
    codes.scatter_(-1, positions, kept_codes.reshape(rows, kept // keep, keep))
    return codes.reshape(rows, -1)


def dequantize(
    planes: list[torch.Tensor],
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group: int,
    index: torch.Tensor | None = None,
    keep: int = 0,
    span: int = 0,
) -> torch.Tensor:
    codes = unpack_codes(planes, bits)
    if index is not None:
        shape = (codes.shape[0], codes.shape[1] * span // keep)
        codes = expand_nm(codes, index, keep, span, zero_codes(zeros, bits, group, shape))
    cols = codes.shape[-1]
    grouped = codes.reshape(*codes.shape[:-1], cols // group, group).float()
    if is_offset(zeros):
        assert zeros is not None
        return (grouped * scales.float()[..., None] + zeros.float()[..., None]).reshape(codes.shape)
    zero = float(1 << (bits - 1)) if zeros is None else zeros.float()[..., None]
    return ((grouped - zero) * scales.float()[..., None]).reshape(codes.shape)


def _half_at_least(scale: torch.Tensor) -> torch.Tensor:
    """The scale as stored (float16), rounded up so the largest weight is not clipped."""
    scale = scale.clamp(min=1e-6)
    stored = scale.half()
    stored = torch.where(stored.float() < scale, torch.nextafter(stored, torch.tensor(torch.inf, dtype=torch.float16)), stored)
    return stored.float()


def group_params(grouped: torch.Tensor, bits: int, symmetric: bool, offset: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (both float, the zero an integer value) of each group along
    the last axis of `grouped`, as stored: the scale float16-representable.

    Symmetric: abs-max scale over 2^(bits-1) - 1 levels each side, zero 2^(bits-1); at 2
    bits that leaves one level, so the scale is the group's mean nonzero |w| (ternary).
    Asymmetric: min-max over 2^bits - 1 levels, the range widened to include 0 so that a
    pruned weight has an exact code (the integer zero point).
    Offset: min-max over 2^bits - 1 levels of the group's own range; the second value is
    the offset (the minimum), both float16 to nearest, as Q4_1 stores them."""
    top = (1 << bits) - 1
    if offset:
        low = grouped.amin(-1).half().float()
        scale = ((grouped.amax(-1) - low) / top).clamp(min=1e-6).half().float()
        return scale, low
    if symmetric:
        half = 1 << (bits - 1)
        if bits <= 2:
            nonzero = (grouped != 0).sum(-1).clamp(min=1)
            scale = grouped.abs().sum(-1) / nonzero
        else:
            scale = grouped.abs().amax(-1) / (half - 1)
        scale = _half_at_least(scale)
        return scale, torch.full_like(scale, float(half))
    low = grouped.amin(-1).clamp(max=0)
    high = grouped.amax(-1).clamp(min=0)
    scale = _half_at_least((high - low) / top)
    return scale, torch.round(-low / scale).clamp(0, top)


def round_to_codes(
    values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool, offset: bool = False
) -> torch.Tensor:
    """Nearest codes (float) of `values` given the broadcastable scale and zero (the offset
    grid: the offset); 0 -> zero."""
    if offset:
        return torch.round((values - zero) / scale).clamp(0, (1 << bits) - 1)
    low = 1 if symmetric else 0
    return (torch.round(values / scale) + zero).clamp(low, (1 << bits) - 1)


def decode_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, offset: bool = False) -> torch.Tensor:
    """Weights of `codes` given the broadcastable scale and zero point (or offset)."""
    return codes * scale + zero if offset else (codes - zero) * scale


def quantize(
    weight: torch.Tensor,
    bits: int,
    group: int,
    symmetric: bool,
    params: tuple[torch.Tensor, torch.Tensor] | None = None,
    offset: bool = False,
) -> PackedWeight:
    """Group quantization of W[N, K] to packed codes; zeros in W stay exactly zero (except
    on the offset grid, which has no code for 0).

    params: (scale, zero) [N, ceil(K / group)] chosen elsewhere (GPTQ fixes them group by
    group while it quantizes); default round-to-nearest with group_params. A ragged last
    group is padded with zeros, which change no group's parameters (every range holds 0;
    the ternary scale averages nonzero weights) and take the zero code."""
    rows, cols = weight.shape
    stored = padded_width(cols, group)
    padded = torch.nn.functional.pad(weight.detach().float(), (0, stored - cols))
    grouped = padded.reshape(rows, stored // group, group)
    if offset and symmetric:
        raise ValueError("the offset grid is asymmetric by construction; pass symmetric=False")
    if offset and stored != cols:
        # The padding would join the last group's range and decode to its offset, not 0.
        raise ValueError(f"the offset grid needs K ({cols}) to be a multiple of the group ({group})")
    scale, zero = params if params is not None else group_params(grouped, bits, symmetric, offset)
    codes = round_to_codes(grouped, scale[..., None], zero[..., None], bits, symmetric, offset)
    codes = codes.reshape(rows, stored).to(torch.int32)
    zeros = zero.half() if offset else None if symmetric else zero.to(torch.uint8)
    return PackedWeight(pack_codes(codes, bits), scale.half(), zeros, bits, group, cols=0 if stored == cols else cols)


def padded_width(cols: int, group: int) -> int:
    """`cols` rounded up to whole groups: the width packed codes are stored for."""
    return -(-cols // group) * group


def planes_of(plane0: T, plane1: T | None) -> list[T]:
    """The op arguments (plane0, plane1 or None) as the list of planes; any tensor type
    (torch, TE, ONNX values), so every lowering reads the arguments the same way."""
    return [plane0] if plane1 is None else [plane0, plane1]


@torch.library.custom_op("edgec::qlinear", mutates_args=())
def qlinear(
    x: torch.Tensor,
    plane0: torch.Tensor,
    plane1: torch.Tensor | None,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group: int,
) -> torch.Tensor:
    """y = x @ W^T + bias with W packed; the reference every backend kernel is checked against.
    K is x's width: the columns stored past it (a ragged last group) are not read."""
    weight = dequantize(planes_of(plane0, plane1), scales, zeros, bits, group).to(x.dtype)
    return nn.functional.linear(x, weight[:, : x.shape[-1]], bias)


@qlinear.register_fake
def _qlinear_shape(x, plane0, plane1, scales, zeros, bias, bits, group):  # type: ignore[no-untyped-def]
    return x.new_empty((*x.shape[:-1], plane0.shape[0]))


@torch.library.custom_op("edgec::qlinear_nm", mutates_args=())
def qlinear_nm(
    x: torch.Tensor,
    plane0: torch.Tensor,
    plane1: torch.Tensor | None,
    index: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group: int,
    keep: int,
    span: int,
) -> torch.Tensor:
    """qlinear with N:M compressed codes (see the module docstring)."""
    weight = dequantize(planes_of(plane0, plane1), scales, zeros, bits, group, index, keep, span).to(x.dtype)
    return nn.functional.linear(x, weight[:, : x.shape[-1]], bias)


@qlinear_nm.register_fake
def _qlinear_nm_shape(x, plane0, plane1, index, scales, zeros, bias, bits, group, keep, span):  # type: ignore[no-untyped-def]
    return x.new_empty((*x.shape[:-1], plane0.shape[0]))


def _packed_setup(ctx, inputs, output):  # type: ignore[no-untyped-def]
    """Packed weights are frozen: backward needs x's gradient only, from the packed
    tensors (parameters, kept anyway), so nothing new is saved for it."""
    ctx.args = inputs[1:]
    ctx.cols = inputs[0].shape[-1]


def _qlinear_backward(ctx, grad):  # type: ignore[no-untyped-def]
    plane0, plane1, scales, zeros, _bias, bits, group = ctx.args
    weight = dequantize(planes_of(plane0, plane1), scales, zeros, bits, group)[:, : ctx.cols].to(grad.dtype)
    return (grad @ weight, *([None] * 7))


def _qlinear_nm_backward(ctx, grad):  # type: ignore[no-untyped-def]
    plane0, plane1, index, scales, zeros, _bias, bits, group, keep, span = ctx.args
    weight = dequantize(planes_of(plane0, plane1), scales, zeros, bits, group, index, keep, span)[:, : ctx.cols].to(grad.dtype)
    return (grad @ weight, *([None] * 10))


# LoRA tuning on a compressed model (edgec finetune) backpropagates through packed linears.
qlinear.register_autograd(_qlinear_backward, setup_context=_packed_setup)
qlinear_nm.register_autograd(_qlinear_nm_backward, setup_context=_packed_setup)


@torch.library.custom_op("edgec::qembedding", mutates_args=())
def qembedding(
    ids: torch.Tensor,
    plane0: torch.Tensor,
    plane1: torch.Tensor | None,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group: int,
) -> torch.Tensor:
    """Rows of a packed table, decoded to float32 (only the rows asked for)."""
    rows = [plane[ids] for plane in planes_of(plane0, plane1)]
    return dequantize(rows, scales[ids], None if zeros is None else zeros[ids], bits, group)


@qembedding.register_fake
def _qembedding_shape(ids, plane0, plane1, scales, zeros, bits, group):  # type: ignore[no-untyped-def]
    hidden = plane0.shape[1] * 8 // PLANE_WIDTHS[bits][0]
    return ids.new_empty((*ids.shape, hidden), dtype=torch.float32)


def frozen(tensor: torch.Tensor) -> nn.Parameter:
    """Packed tensors are Parameters, not buffers: TVM's importer binds buffers as
    constants (folded into fp32 in the library) but keeps parameters as inputs."""
    if isinstance(tensor, nn.Parameter):
        return tensor
    return nn.Parameter(tensor, requires_grad=False)


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted `name` (passes swap nn.Linear for packed modules)."""
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def unique_weight_bytes(root: nn.Module) -> int:
    """Bytes of weights, counting a tensor shared by tied modules once."""
    unique = {t.data_ptr(): t for t in root.state_dict().values()}
    return sum(t.numel() * t.element_size() for t in unique.values())


class _PackedStore(nn.Module):
    def __init__(self, packed: PackedWeight) -> None:
        super().__init__()
        self.plane0 = frozen(packed.planes[0])
        self.plane1 = frozen(packed.planes[1]) if len(packed.planes) > 1 else None
        self.scales = frozen(packed.scales)
        self.zeros = None if packed.zeros is None else frozen(packed.zeros)
        self.index = None if packed.index is None else frozen(packed.index)
        self.bits = packed.bits
        self.group = packed.group
        self.keep = packed.keep
        self.span = packed.span
        self.cols = packed.cols

    @property
    def packed(self) -> PackedWeight:
        planes = planes_of(self.plane0, self.plane1)
        return PackedWeight(planes, self.scales, self.zeros, self.bits, self.group, self.index, self.keep, self.span, self.cols)

    def weight_fp32(self) -> torch.Tensor:
        packed = self.packed
        weight = dequantize(packed.planes, self.scales, self.zeros, self.bits, self.group, self.index, self.keep, self.span)
        return weight[:, : packed.shape[1]]


class PackedLinear(_PackedStore):
    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None) -> None:
        super().__init__(packed)
        self.bias = None if bias is None else frozen(bias.detach().clone())
        self.out_features, self.in_features = packed.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.index is not None:
            return torch.ops.edgec.qlinear_nm(
                x, self.plane0, self.plane1, self.index, self.scales, self.zeros, self.bias, self.bits, self.group, self.keep, self.span
            )
        return torch.ops.edgec.qlinear(x, self.plane0, self.plane1, self.scales, self.zeros, self.bias, self.bits, self.group)


class PackedEmbedding(_PackedStore):
    def __init__(self, packed: PackedWeight) -> None:
        super().__init__(packed)
        self.num_embeddings, self.embedding_dim = packed.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = torch.ops.edgec.qembedding(ids, self.plane0, self.plane1, self.scales, self.zeros, self.bits, self.group)
        # A ragged last group: the op decodes whole groups; the slice is an ordinary graph op.
        return rows[..., : self.embedding_dim] if self.cols else rows
