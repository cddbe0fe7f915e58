"""Graph families: a model that arrives as a graph, not as weights plus an architecture.

    exported-program   a torch.export .pt2 file (its own reference: the program in torch)
    onnx-graph         an .onnx file (its reference: ONNX Runtime's CPU provider on the
                       graph as given; cleaned and shape-fixed before it is built)

Each has one entry, `main`, driven by a `forward` program.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgec.errors import BadInputError, UnsupportedError
from edgec.families import Family, Progress, register
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

    def prepare(self, model: ModelHandle, recipe: Recipe, progress: Progress) -> None:
        """The user's shapes written into the graph, then the graph cleaned (edgec.onnx_cleanup);
        the reference inputs: the user's file, or made up from what the graph says."""
        self.check_sections(model, recipe)
        import onnx

        from edgec import onnx_cleanup, onnx_inputs

        assert model.onnx_path is not None
        proto = onnx.load(str(model.onnx_path))
        inputs = onnx_inputs.fix_shapes(proto, recipe.inputs, model.name)
        progress("onnx: infer shapes, fold constants, lift Constant weights (onnxscript optimizer)")
        cleaned = onnx_cleanup.clean(proto)
        progress(f"onnx: {cleaned.note}")
        if recipe.inputs.file is not None:
            first = onnx_inputs.read_inputs(recipe.inputs.file, inputs)
            taken = onnx_inputs.sizes_of(inputs, first)
        else:
            taken = onnx_inputs.sizes_for(inputs, 0)
            first = onnx_inputs.make_inputs(proto, inputs, taken, seed=0)
        cases = [first]
        if onnx_inputs.symbolic(inputs):
            # Other sizes than the first case's (+1 where the user's file happened to use them).
            second = {key: size + (size == taken.get(key)) for key, size in onnx_inputs.sizes_for(inputs, 1).items()}
            cases.append(onnx_inputs.make_inputs(proto, inputs, second, seed=1))
        model.prepared = {"graph": cleaned.model, "inputs": inputs, "cases": cases}
        model.info["parameters"] = onnx_cleanup.parameters(cleaned.model)
        model.info["cleanup"] = cleaned.note
        model.info["reference_inputs"] = f"--reference-inputs {recipe.inputs.file}" if recipe.inputs.file else "made from the graph (seed 0)"

    def entries(self, model: ModelHandle) -> list[ExportedEntry]:
        if not model.prepared:
            from edgec.recipe import Recipe

            self.prepare(model, Recipe(), lambda message: None)
        first = tuple(torch.from_numpy(x) for x in model.prepared["cases"][0])
        graph = model.prepared["graph"]
        names = [i.name for i in model.prepared["inputs"]]
        return [ExportedEntry("main", None, None, first, None, names, [o.name for o in graph.graph.output], onnx_model=graph)]

    def reference(self, model: ModelHandle, entries: list[ExportedEntry], recipe: Recipe) -> dict[str, list[np.ndarray]]:
        """ONNX Runtime's CPU provider on the graph as the user gave it (the de facto reference:
        onnx.reference computes BatchNormalization with batch statistics when a node carries
        `momentum`, which other frameworks export). A second case, at other sizes of the
        dimensions left symbolic, is kept only if the graph runs at them."""
        import onnxruntime as ort

        assert model.onnx_path is not None
        (entry,) = entries
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(model.onnx_path), options, providers=["CPUExecutionProvider"])
        io: dict[str, list[np.ndarray]] = {}
        for index, inputs in enumerate(model.prepared["cases"]):
            feed = dict(zip(entry.input_names, inputs))
            try:
                outputs = session.run(entry.output_names, feed)
            except Exception as exc:  # noqa: BLE001 - ORT raises its own Fail / InvalidArgument / RuntimeException
                if index:  # the graph takes one size only there: checked at the first
                    break
                shapes = ", ".join(f"{n}={'x'.join(map(str, x.shape))}" for n, x in feed.items())
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise BadInputError(f"{model.name}: the reference (ONNX Runtime) cannot run it on inputs {shapes} ({first[:300]}); "
                                    "give the sizes it takes with --input-shape NAME=AxBxC or --dim NAME=N, "
                                    "or real inputs with --reference-inputs FILE.npz") from None
            key = entry.name if index == 0 else f"{entry.name}@{index + 1}"
            io[f"{key}.in"] = list(inputs)
            io[f"{key}.out"] = [np.asarray(x) for x in outputs]
        # Which input shapes parity runs: two sizes where a dimension stays symbolic.
        model.info["checked_shapes"] = [
            {name: list(x.shape) for name, x in zip(entry.input_names, io[key])} for key in io if key.endswith(".in")
        ]
        return io

    def reference_rule(self) -> str:
        return "onnxruntime CPUExecutionProvider"


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
        initializers = {t.name for t in model.graph.initializer}
    except (onnx.checker.ValidationError, onnx.onnx_cpp2py_export.checker.ValidationError, OSError, ValueError) as exc:
        raise BadInputError(f"{path} is not a valid ONNX model ({str(exc).splitlines()[0]})") from None
    from edgec.onnx_cleanup import parameters

    return ModelHandle(
        name=str(path),
        family=FAMILY_ONNX,
        architecture=f"onnx-opset{model.opset_import[0].version if model.opset_import else '?'}",
        source=path,
        sha256=sha256_files([path]),
        onnx_path=path,
        info={"parameters": parameters(model), "inputs": [i.name for i in model.graph.input if i.name not in initializers]},
    )


register(ExportedProgramFamily())
register(OnnxGraph())
