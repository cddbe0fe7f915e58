"""ONNX backend: ExportedProgram -> ONNX (torch dynamo exporter) -> ONNX Runtime.

Each entry becomes its own graph (prefill.onnx, decode.onnx) and the large
initializers of all of them go once into weights.bin as ONNX external data:
equal tensors share one extent, so the two entries cost one copy of the weights.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


from edgec.targets.export import ExportedEntry
from edgec.targets.registry import ResolvedTarget

WEIGHTS_FILE = "weights.bin"
OPSET = 18
_EXTERNAL_MIN_BYTES = 1024
_ALIGN = 64


def _tensor_bytes(tensor: Any) -> bytes:
    from onnx import numpy_helper

    if tensor.HasField("raw_data"):
        return bytes(tensor.raw_data)
    return numpy_helper.to_array(tensor).tobytes()


def share_external_data(models: dict[str, Any], weights_path: Path) -> int:
    """Move large initializers of every model into one file, storing equal tensors once."""
    from onnx import TensorProto

    extents: dict[str, tuple[int, int]] = {}
    offset = 0
    with open(weights_path, "wb") as handle:
        for model in models.values():
            for tensor in model.graph.initializer:
                raw = _tensor_bytes(tensor)
                if len(raw) < _EXTERNAL_MIN_BYTES:
                    continue
                digest = hashlib.sha256(raw + str(tensor.data_type).encode() + str(list(tensor.dims)).encode()).hexdigest()
                if digest not in extents:
                    padding = (-offset) % _ALIGN
                    handle.write(b"\0" * padding)
                    offset += padding
                    handle.write(raw)
                    extents[digest] = (offset, len(raw))
                    offset += len(raw)
                start, length = extents[digest]
                for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                    tensor.ClearField(field)
                del tensor.external_data[:]
                tensor.data_location = TensorProto.EXTERNAL
                for key, value in (("location", weights_path.name), ("offset", str(start)), ("length", str(length))):
                    entry = tensor.external_data.add()
                    entry.key = key
                    entry.value = value
    return offset


def build(
    entries: list[ExportedEntry],
    target: ResolvedTarget,
    out_dir: Path,
    progress: Callable[[str], None],
    dtype: str = "float32",
    tuning: Any | None = None,
) -> dict[str, Any]:
    """`dtype` is recorded only: a float16 model arrives already cast (compiler). `tuning`
    (the schedule pass's options) is for TVM: ONNX Runtime picks its kernels at load."""
    import onnx
    import torch

    # The exporter warns once per missing torchvision op; edgec exports no vision ops.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    models: dict[str, Any] = {}
    record: dict[str, Any] = {"entries": {}, "weights_file": WEIGHTS_FILE, "opset": OPSET, "dtype": dtype}
    for entry in entries:
        start = time.perf_counter()
        if entry.onnx_model is not None:
            proto = onnx.ModelProto()
            proto.CopyFrom(entry.onnx_model)
            models[entry.name] = proto
            record["entries"][entry.name] = _entry_record(entry, proto, start)
            continue
        progress(f"onnx: export {entry.name}")
        from edgec.targets.onnx_packed import translation_table

        program = torch.onnx.export(
            entry.program,
            entry.example,
            dynamo=True,
            opset_version=OPSET,
            input_names=entry.input_names,
            output_names=entry.output_names,
            verbose=False,
            optimize=False,
            custom_translation_table=translation_table(),
        )
        # No onnxscript optimizer: its constant folding counts elements, not bytes, so it
        # turns Cast(int8 weight) into an fp32 initializer and the artifact grows back.
        # ONNX Runtime applies its own graph optimizations when the session loads.
        proto = program.model_proto
        # Stack traces in metadata are ~40% of the file and useless on a device.
        for node in proto.graph.node:
            del node.metadata_props[:]
        models[entry.name] = proto
        record["entries"][entry.name] = _entry_record(entry, proto, start)
    packed = _packed_bits(entries)
    if packed:
        from edgec.targets.onnx_packed import lowering_note

        record["packed_weights"] = {str(bits): lowering_note(bits, group) for bits, group in packed}
    share_external_data(models, out_dir / WEIGHTS_FILE)
    for name, proto in models.items():
        onnx.save_model(proto, str(out_dir / f"{name}.onnx"))
    import onnxruntime

    record["ort_provider"] = target.spec.ort_provider
    record["ort_version_built_with"] = onnxruntime.__version__
    return record


def _packed_bits(entries: list[ExportedEntry]) -> list[tuple[int, int]]:
    """The (bits, group) of edgec::qlinear calls in the entries (to say how each is lowered)."""
    import torch

    found: set[tuple[int, int]] = set()
    for entry in entries:
        if entry.program is None:
            continue
        for node in entry.program.graph.nodes:
            if node.op == "call_function" and node.target is torch.ops.edgec.qlinear.default:
                found.add((int(node.args[6]), int(node.args[7])))
    return sorted(found, reverse=True)


def _entry_record(entry: ExportedEntry, proto: Any, start: float) -> dict[str, Any]:
    return {
        "file": f"{entry.name}.onnx",
        "inputs": entry.input_names,
        "outputs": entry.output_names,
        "seconds": round(time.perf_counter() - start, 2),
        "ops": sorted({node.op_type for node in proto.graph.node}),
    }
