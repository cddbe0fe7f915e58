"""The GCN family (MixGCN's inference artifact): a model directory of edgec/gcn/model.py,
compiled for the graph it runs on (`edgec compile GCN --graph G.npz`).

Each layer is split into its two accelerators' parts, in the order the layer runs
(aggregate first when it is the narrower side, as training does):
  sparse{l}  A_hat h over the graph's edges sorted by target row. TVM: the op
             `edgec::segment_sum`, lowered to the segment-sum kernel of targets/tvm_sparse.py
             (inputs h, indptr, source, weight). ONNX: index_select + index_add, which
             exports to ScatterND (inputs h, source, target, weight).
  dense{l}   h W^T, a GEMM.
The layer's bias and ReLU go with whichever part runs last. A `steps` program chains the
parts by value names (targets/runtime.py); parity checks every part on its reference
inputs and the chain against the whole model's logits, on the host or on a device.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgec.errors import BadInputError
from edgec.families import Family, Progress, Section, entry_io, register
from edgec.model import ModelHandle, sha256_files
from edgec.recipe import Recipe
from edgec.targets.export import ExportedEntry

FAMILY_GCN = "gcn"


class GcnSection(Section):
    graph: str
    graph_sha256: str
    num_nodes: int
    num_edges: int
    widths: list[int]
    layers: list[dict[str, Any]]
    parts: dict[str, str]


class Dense(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, relu: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.relu = relu

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = nn.functional.linear(h, self.weight, self.bias)
        return torch.relu(out) if self.relu else out


class _SparsePart(nn.Module):
    """A_hat h, with the layer's bias and ReLU when the sparse part runs last."""

    def __init__(self, bias: torch.Tensor | None, relu: bool) -> None:
        super().__init__()
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.relu = relu


class SegmentSum(_SparsePart):
    """The sparse part as the TVM backend builds it (one op, our kernel)."""

    def forward(self, h: torch.Tensor, indptr: torch.Tensor, source: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        import edgec.gcn.ops  # noqa: F401  (registers edgec::segment_sum)

        return torch.ops.edgec.segment_sum(h, indptr, source, weight, self.bias, self.relu)


class IndexAdd(_SparsePart):
    """The sparse part as the ONNX backend exports it (ScatterND add)."""

    def forward(self, h: torch.Tensor, source: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(h).index_add(0, target, h.index_select(0, source) * weight.unsqueeze(1))
        if self.bias is not None:
            out = out + self.bias
        return torch.relu(out) if self.relu else out


SPARSE_INPUTS = {"tvm": ["indptr", "source", "weight"], "onnx": ["source", "target", "weight"]}


class GcnFamily(Family):
    name = FAMILY_GCN
    section_key = "gcn"
    Section = GcnSection
    architectures = ("edgec-gcn",)
    part_kinds = ("sparse", "dense")

    def part_of(self, entry: str) -> str:
        return entry.rstrip("0123456789")  # sparse0 -> sparse

    def recognise(self, path: Path) -> bool:
        from edgec.gcn.model import is_gcn_dir

        return path.is_dir() and is_gcn_dir(path)

    def load(self, path: Path, name: str | None, trust_pickle: bool) -> ModelHandle:
        from edgec.gcn.model import CONFIG, WEIGHTS, load_gcn

        module = load_gcn(path)
        config = module.config
        return ModelHandle(name=name or str(path), family=FAMILY_GCN, architecture="GCN", source=path,
                           sha256=sha256_files([path / CONFIG, path / WEIGHTS]), module=module,
                           info={"parameters": sum(p.numel() for p in module.parameters()), "widths": config.widths(),
                                 "self_loops": config.self_loops, "trained_on": config.graph})

    def prepare(self, model: ModelHandle, recipe: Recipe, progress: Progress) -> None:
        """The graph: read, checked against the model, its A_hat sorted by target row."""
        from edgec.gcn.graph import graph_path, read_graph
        from edgec.gcn.model import normalized_edges
        from edgec.targets.tvm_sparse import csr_by_target

        super().prepare(model, recipe, progress)
        if recipe.graph is None:
            raise BadInputError(f"{model.name}: a GCN is compiled for the graph it runs on: add --graph G.npz (or zoo:wordnet)")
        graph = read_graph(graph_path(recipe.graph, progress))
        config = model.module.config  # type: ignore[union-attr]
        if graph.features.shape[1] != config.in_features:
            raise BadInputError(f"--graph {recipe.graph}: {graph.features.shape[1]} features per node, the model reads "
                                f"{config.in_features}; give the graph it was trained for ({config.graph})")
        source, target, weight = normalized_edges(graph.edge_index, graph.num_nodes, config.self_loops)
        indptr, by_row, weights = csr_by_target(source, target, weight, graph.num_nodes)
        targets = np.repeat(np.arange(graph.num_nodes, dtype=np.int64), np.diff(indptr))
        progress(f"graph {graph.name}: {graph.num_nodes:,} nodes, {len(by_row):,} edges of A_hat")
        model.prepared = {"graph": graph, "backend": recipe.backend, "values": {
            "x": graph.features, "indptr": indptr, "source": by_row, "target": targets, "weight": weights}}

    def _parts(self, model: ModelHandle) -> list[tuple[str, nn.Module, list[str], str]]:
        """(entry, module, input value names, output value name) in run order."""
        assert model.module is not None
        convs = model.module.convs
        sparse_inputs = SPARSE_INPUTS[model.prepared["backend"]]
        sparse_class: type[_SparsePart] = SegmentSum if model.prepared["backend"] == "tvm" else IndexAdd
        parts: list[tuple[str, nn.Module, list[str], str]] = []
        value = "x"
        for index, conv in enumerate(convs):
            relu = index < len(convs) - 1
            out = f"h{index + 1}" if relu else "logits"
            if conv.aggregate_first:
                parts.append((f"sparse{index}", sparse_class(None, False), [value, *sparse_inputs], f"a{index}"))
                parts.append((f"dense{index}", Dense(conv.lin.weight, conv.bias, relu), [f"a{index}"], out))
            else:
                parts.append((f"dense{index}", Dense(conv.lin.weight, None, False), [value], f"t{index}"))
                parts.append((f"sparse{index}", sparse_class(conv.bias, relu), [f"t{index}", *sparse_inputs], out))
            value = out
        return parts

    def entries(self, model: ModelHandle) -> list[ExportedEntry]:
        values = {name: torch.from_numpy(array) for name, array in model.prepared["values"].items()}
        dynamic = torch.export.Dim.DYNAMIC
        entries = []
        with torch.no_grad():
            for name, module, inputs, output in self._parts(model):
                example = tuple(values[v] for v in inputs)
                shapes = tuple({0: dynamic} for _ in inputs)
                program = torch.export.export(module.eval(), example, dynamic_shapes=shapes)
                entries.append(ExportedEntry(name, program, module, example, shapes, ["h", *inputs[1:]] if len(inputs) > 1 else ["h"],
                                             ["out"]))
                values[output] = module(*example)
        return entries

    def reference(self, model: ModelHandle, entries: list[ExportedEntry], recipe: Recipe) -> dict[str, list[np.ndarray]]:
        """Every part on its real inputs; and the whole model (its index_add form, equal to
        PyG's GCN) on the graph, which the chained parts must reproduce."""
        io = super().reference(model, entries, recipe)
        assert model.module is not None
        from edgec.gcn.model import normalized_edges

        graph = model.prepared["graph"]
        source, target, weight = normalized_edges(graph.edge_index, graph.num_nodes, model.module.config.self_loops)
        with torch.no_grad():
            logits = model.module(torch.from_numpy(graph.features), torch.from_numpy(source), torch.from_numpy(target),
                                  torch.from_numpy(weight))
        io["steps.out"] = [logits.numpy()]
        io["steps.labels"] = [graph.labels]
        return io

    def program(self, model: ModelHandle, entries: list[ExportedEntry], recipe: Recipe) -> dict[str, Any]:
        parts = self._parts(model)
        produced = {output for _, _, _, output in parts}
        sources: dict[str, str] = {}
        for name, _, inputs, _ in parts:
            for index, value in enumerate(inputs):
                if value not in produced and value not in sources:
                    sources[value] = f"{name}.in.{index}"
        return {"kind": "steps", "entries": entry_io(entries), "inputs": sources,
                "steps": [{"entry": name, "inputs": inputs, "output": output} for name, _, inputs, output in parts],
                "output": "logits"}

    def section(self, model: ModelHandle, entries: list[ExportedEntry], recipe: Recipe) -> Section | None:
        assert model.module is not None
        graph = model.prepared["graph"]
        backend = model.prepared["backend"]
        layers = [{"layer": i, "order": "aggregate-first" if conv.aggregate_first else "transform-first",
                   "sparse": f"sparse{i}", "dense": f"dense{i}"} for i, conv in enumerate(model.module.convs)]
        sparse = ("edgec::segment_sum -> the CSR segment-sum kernel (targets/tvm_sparse.py)" if backend == "tvm"
                  else "index_select + index_add (ScatterND add)")
        return GcnSection(graph=graph.name, graph_sha256=graph.sha256(), num_nodes=graph.num_nodes,
                          num_edges=len(model.prepared["values"]["source"]), widths=model.module.config.widths(), layers=layers,
                          parts={"sparse": f"{self._target_of('sparse', recipe)}/{backend}: {sparse}",
                                 "dense": f"{self._target_of('dense', recipe)}/{backend}: GEMM"})

    @staticmethod
    def _target_of(part: str, recipe: Recipe) -> str:
        from edgec.targets.registry import is_part_targets, part_target_names

        return part_target_names(recipe.target)[part] if is_part_targets(recipe.target) else recipe.target

    def describe_section(self, section: dict[str, Any]) -> str:
        orders = ", ".join(layer["order"] for layer in section["layers"])
        return (f"graph {section['graph']} ({section['num_nodes']:,} nodes, {section['num_edges']:,} edges), widths "
                f"{section['widths']}, layers {orders}")

    def run(self, root: Path, manifest: dict[str, Any], runtime: Any, request: dict[str, Any]) -> dict[str, Any]:
        """The chained parts on the graph the artifact was built for; the time of each part."""
        from edgec.artifact import load_reference
        from edgec.targets.runtime import run_steps, steps_inputs

        reference = load_reference(root)
        program = manifest["program"]
        times: dict[str, float] = {}
        began = time.perf_counter()
        logits = np.asarray(run_steps(runtime, program, steps_inputs(program, reference),
                                      lambda entry, ms: times.__setitem__(entry, ms)))
        total = (time.perf_counter() - began) * 1e3
        predicted = logits.argmax(-1)
        result: dict[str, Any] = {"artifact": str(root), "backend": manifest["backend"], "ms": total, "parts_ms": times,
                                  "nodes": int(logits.shape[0]), "classes": int(logits.shape[1]),
                                  "max_abs_diff_to_reference": float(np.abs(logits - reference["steps.out.0"]).max())}
        if "steps.labels.0" in reference:
            result["accuracy_all_nodes"] = float((predicted == reference["steps.labels.0"]).mean())
        return result

    def describe_run(self, result: dict[str, Any]) -> tuple[list[str], str]:
        lines = [f"logits [{result['nodes']}, {result['classes']}], max |diff| to the model's {result['max_abs_diff_to_reference']:.3g}"]
        if "accuracy_all_nodes" in result:
            lines.append(f"accuracy over all nodes (train, val and test): {result['accuracy_all_nodes']:.4f}")
        parts = ", ".join(f"{entry} {ms:.1f} ms" for entry, ms in result["parts_ms"].items())
        return lines, f"{result['ms']:.1f} ms ({parts}; {result['backend']})"


register(GcnFamily())
