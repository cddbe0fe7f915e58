"""Clean-up of an .onnx graph before it is built: what other exporters leave for the
runtime to work out, worked out once.

onnxscript's optimizer infers shapes, folds constants and simplifies shape
subgraphs (Shape -> Gather -> Concat -> Reshape becomes a constant shape once the
input sizes are known), so TVM's importer, which wants Reshape and Resize shapes it
can read, gets them. Weights kept in Constant nodes are lifted to initializers (onnx_ir),
so they are parameters like any other: counted, stored once, seen by weight passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgec.targets.runtime import one_line

# Elements above which a Constant is a weight (lifted); smaller ones are shapes and scalars.
LIFT_MIN_ELEMENTS = 16
# ONNX float element types (float, float16, double, bfloat16): weights, not shapes.
FLOAT_TYPES = (1, 10, 11, 16)


@dataclass(frozen=True)
class Cleaned:
    model: Any  # onnx.ModelProto
    note: str  # what was done, or why the graph was kept as it was


def clean(proto: Any) -> Cleaned:
    """The cleaned graph; the graph unchanged (with the reason) if the optimizer fails on it."""
    import onnx_ir as ir
    import onnxscript.optimizer
    from onnx_ir.passes import common

    before = len(proto.graph.node)
    try:
        model = ir.from_proto(proto)
        common.RemoveInitializersFromInputsPass()(model)
        weights_before = len(model.graph.initializers)
        onnxscript.optimizer.optimize_ir(model)
        common.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=LIFT_MIN_ELEMENTS)(model)
        common.RemoveUnusedNodesPass()(model)
        weights_after = len(model.graph.initializers)
        cleaned = ir.to_proto(model)
    except Exception as exc:  # noqa: BLE001 - the optimizer's failure is no reason to refuse the model
        return Cleaned(proto, f"kept as given: the optimizer failed ({one_line(exc, limit=250)})")
    after = len(cleaned.graph.node)
    return Cleaned(cleaned, f"{before} -> {after} nodes (shapes inferred, constants folded), initializers {weights_before} -> {weights_after}")


def parameters(proto: Any) -> int:
    """Weights in initializers and in float Constant nodes (where some exporters keep them)."""
    import math

    count = sum(math.prod(t.dims) for t in proto.graph.initializer)
    for node in proto.graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value" and attribute.t.data_type in FLOAT_TYPES:
                    count += math.prod(attribute.t.dims)
    return count
