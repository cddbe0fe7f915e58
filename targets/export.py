"""torch.export of a model's runnable entries, shared by both backends.

Before: a ModelHandle (an HF causal LM after model-level passes, or a .pt2).
After: named ExportedPrograms with dynamic batch / sequence / past-length
dimensions, plus the example inputs they were traced with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from edgec.errors import UnsupportedError
from edgec.lm import CausalLMEntries, DecodeEntry, PrefillEntry
from edgec.model import FAMILY_CAUSAL_LM, FAMILY_EXPORTED, FAMILY_ONNX, ModelHandle

PREFILL_IO = (["input_ids"], ["logits", "present_k", "present_v"])
DECODE_IO = (["input_ids", "past_k", "past_v"], ["logits", "present_k", "present_v"])
# Calibrated attention heads (act, stat: causal) carry their column sums as one more cache tensor.
STATE_INPUT, STATE_OUTPUT = "past_s", "present_s"


@dataclass
class ExportedEntry:
    """One runnable entry: a torch program, or (for .onnx inputs) an ONNX graph."""

    name: str
    program: torch.export.ExportedProgram | None
    module: torch.nn.Module | None
    example: tuple[torch.Tensor, ...]
    dynamic_shapes: tuple[dict[int, Any], ...] | None
    input_names: list[str]
    output_names: list[str]
    onnx_model: Any | None = None


def export_entries(model: ModelHandle) -> list[ExportedEntry]:
    if model.family == FAMILY_CAUSAL_LM:
        return _export_causal_lm(model)
    if model.family == FAMILY_EXPORTED:
        assert model.exported is not None
        program = model.exported
        names = [str(s.arg.name) for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
        outputs = [f"output_{i}" for i in range(len(program.graph_signature.user_outputs))]
        example = tuple(_example_for(node) for node in program.graph.nodes if node.op == "placeholder" and node.name in names)
        return [ExportedEntry("main", program, program.module(), example, None, names, outputs)]
    if model.family == FAMILY_ONNX:
        return [_onnx_entry(model)]
    raise UnsupportedError(f"{model.name}: family {model.family} has no entries to export")


_ONNX_DTYPES: dict[int, torch.dtype] = {1: torch.float32, 6: torch.int32, 7: torch.int64, 9: torch.bool, 10: torch.float16}


def _onnx_entry(model: ModelHandle) -> ExportedEntry:
    """An .onnx input is already a graph: its entry carries the model and example inputs
    built from its declared input types (symbolic dimensions become 2)."""
    import onnx

    assert model.onnx_path is not None
    proto = onnx.load(str(model.onnx_path))
    initializers = {t.name for t in proto.graph.initializer}
    example: list[torch.Tensor] = []
    names: list[str] = []
    generator = torch.Generator().manual_seed(0)
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dtype = _ONNX_DTYPES.get(tensor_type.elem_type)
        if dtype is None:
            raise UnsupportedError(f"{model.name}: input {value.name} has ONNX type {tensor_type.elem_type}; edgec feeds float/int/bool inputs")
        shape = [d.dim_value if d.HasField("dim_value") else 2 for d in tensor_type.shape.dim]
        if dtype.is_floating_point:
            example.append(torch.randn(shape, generator=generator).to(dtype))
        else:
            example.append(torch.zeros(shape, dtype=dtype))
        names.append(value.name)
    outputs = [o.name for o in proto.graph.output]
    return ExportedEntry("main", None, None, tuple(example), None, names, outputs, onnx_model=proto)


def _example_for(node: torch.fx.Node) -> torch.Tensor:
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor):
        raise UnsupportedError(f"input {node.name} of the .pt2 is not a tensor; edgec lowers tensor inputs only")
    shape = [int(d) if isinstance(d, int) else 2 for d in value.shape]
    if value.dtype.is_floating_point:
        return torch.randn(shape, dtype=value.dtype)
    return torch.zeros(shape, dtype=value.dtype)


def _export_causal_lm(model: ModelHandle) -> list[ExportedEntry]:
    assert model.module is not None
    entries = CausalLMEntries(model.module).eval()
    prefill = PrefillEntry(entries).eval()
    decode = DecodeEntry(entries).eval()
    vocab = int(model.module.config.vocab_size)
    generator = torch.Generator().manual_seed(0)
    # Batch 2 / length 8: size-1 example dims would be specialised to 1 by torch.export.
    ids = torch.randint(0, vocab, (2, 8), generator=generator)
    with torch.no_grad():
        _, *cache = entries.prefill(ids[:, :7])
    dynamic = torch.export.Dim.DYNAMIC
    prefill_shapes: tuple[dict[int, Any], ...] = ({0: dynamic, 1: dynamic},)
    decode_shapes: tuple[dict[int, Any], ...] = ({0: dynamic}, {1: dynamic, 3: dynamic}, {1: dynamic, 3: dynamic})
    prefill_io = (list(PREFILL_IO[0]), list(PREFILL_IO[1]))
    decode_io = (list(DECODE_IO[0]), list(DECODE_IO[1]))
    if entries.state_heads:
        decode_shapes = (*decode_shapes, {1: dynamic, 2: dynamic})
        prefill_io[1].append(STATE_OUTPUT)
        decode_io[0].append(STATE_INPUT)
        decode_io[1].append(STATE_OUTPUT)
    decode_example = (ids[:, 7:8], *cache)
    with torch.no_grad():
        prefill_ep = torch.export.export(prefill, (ids,), dynamic_shapes=prefill_shapes)
        decode_ep = torch.export.export(decode, decode_example, dynamic_shapes=decode_shapes)
    return [
        ExportedEntry("prefill", prefill_ep, prefill, (ids,), prefill_shapes, *prefill_io),
        ExportedEntry("decode", decode_ep, decode, decode_example, decode_shapes, *decode_io),
    ]
