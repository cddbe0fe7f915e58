"""Graph families: a model that arrives as a graph, not as weights plus an architecture.

    exported-program   a torch.export .pt2 file (its own reference: the program in torch)
    onnx-graph         an .onnx file (its reference: the ONNX specification's evaluator)

Each has one entry, `main`, driven by a `forward` program.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgec.errors import BadInputError, UnsupportedError
from edgec.families import Family, register
from edgec.model import FAMILY_EXPORTED, FAMILY_ONNX, ModelHandle, sha256_files
from edgec.recipe import Recipe
from edgec.targets.export import ExportedEntry


class ExportedProgramFamily(Family):
    name = FAMILY_EXPORTED

    def recognise(self, path: Path) -> bool:
        return path.is_file() and path.suffix == ".pt2"

    def load(self, path: Path, name: str | None, trust_pickle: bool) -> ModelHandle:
        return load_pt2(path, trust_pickle)

    def entries(self, model: ModelHandle) -> list[ExportedEntry]:
        assert model.exported is not None
        program = model.exported
        names = [str(s.arg.name) for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
        outputs = [f"output_{i}" for i in range(len(program.graph_signature.user_outputs))]
        example = tuple(_example_for(node) for node in program.graph.nodes if node.op == "placeholder" and node.name in names)
        return [ExportedEntry("main", program, program.module(), example, None, names, outputs)]


class OnnxGraph(Family):
    name = FAMILY_ONNX

    def recognise(self, path: Path) -> bool:
        return path.is_file() and path.suffix == ".onnx"

    def load(self, path: Path, name: str | None, trust_pickle: bool) -> ModelHandle:
        return load_onnx(path)

    def entries(self, model: ModelHandle) -> list[ExportedEntry]:
        return [_onnx_entry(model)]

    def reference(self, model: ModelHandle, entries: list[ExportedEntry], recipe: Recipe) -> dict[str, list[np.ndarray]]:
        """The ONNX specification's own evaluator (onnx.reference), independent of both
        backends, so ORT is never checked against itself."""
        from onnx.reference import ReferenceEvaluator

        io: dict[str, list[np.ndarray]] = {}
        for entry in entries:
            evaluator = ReferenceEvaluator(entry.onnx_model)
            feed = {name: t.numpy() for name, t in zip(entry.input_names, entry.example)}
            io[f"{entry.name}.in"] = [t.numpy() for t in entry.example]
            io[f"{entry.name}.out"] = [np.asarray(x) for x in evaluator.run(entry.output_names, feed)]
        return io

    def reference_rule(self) -> str:
        return "onnx.reference"


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


def load_pt2(path: Path, trust_pickle: bool) -> ModelHandle:
    if not trust_pickle:
        raise BadInputError(
            f"{path}: reading a torch.export archive runs pickle (torch.export.load), which can execute code; "
            "pass --trust-pickle if you made this file or trust its author"
        )
    import zipfile

    try:
        exported = torch.export.load(str(path))
    except (RuntimeError, ValueError, KeyError, OSError, AssertionError, zipfile.BadZipFile) as exc:
        raise BadInputError(f"{path} is not a readable torch.export .pt2 file ({exc}); save it with torch.export.save") from None
    params = sum(t.numel() for t in exported.state_dict.values())
    specs = [str(s.arg.name) for s in exported.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    return ModelHandle(
        name=str(path),
        family=FAMILY_EXPORTED,
        architecture="ExportedProgram",
        source=path,
        sha256=sha256_files([path]),
        exported=exported,
        info={"parameters": params, "inputs": specs},
    )


def load_onnx(path: Path) -> ModelHandle:
    import onnx

    try:
        # Checking by path lets the checker find external data next to the file.
        onnx.checker.check_model(str(path))
        model = onnx.load(str(path), load_external_data=False)
    except (onnx.checker.ValidationError, onnx.onnx_cpp2py_export.checker.ValidationError, OSError, ValueError) as exc:
        raise BadInputError(f"{path} is not a valid ONNX model ({str(exc).splitlines()[0]})") from None
    params = sum(int(torch.Size(t.dims).numel()) for t in model.graph.initializer)
    return ModelHandle(
        name=str(path),
        family=FAMILY_ONNX,
        architecture=f"onnx-opset{model.opset_import[0].version if model.opset_import else '?'}",
        source=path,
        sha256=sha256_files([path]),
        onnx_path=path,
        info={"parameters": params, "inputs": [i.name for i in model.graph.input]},
    )


register(ExportedProgramFamily())
register(OnnxGraph())
