"""The inputs of an .onnx model: the shapes a user fixes, the sizes its symbolic dimensions
get, and reference inputs that look like what the graph will be fed.

What the graph says decides the inputs it gets when the user gives none:
  * integer ids that index an embedding (a Gather on a weight) stay within its rows,
  * masks (an input named *mask*) are all ones, token types zeros, positions 0..n-1,
  * other floats are drawn from a normal distribution, other integers are ones,
  * a symbolic dimension gets a size by what it is: batch 1, an image's height and
    width 224, a sequence 16, anything else 8. One name gets one size everywhere.

A dimension left symbolic in the artifact is checked at a second size too (`second`:
batch 2, image 160, sequence 11, others 5), so dynamic shapes are exercised, not assumed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgec.errors import BadInputError, UnsupportedError
from edgec.recipe import InputsSpec

# ONNX TensorProto element types edgec feeds, as numpy dtypes.
ONNX_DTYPES: dict[int, Any] = {1: np.float32, 2: np.uint8, 3: np.int8, 6: np.int32, 7: np.int64, 9: np.bool_,
                               10: np.float16, 11: np.float64}
# Ops an id passes through unchanged in value on its way to an embedding lookup.
_VALUE_PRESERVING = {"Cast", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Identity", "Expand"}
# (first size, second size) by what a symbolic dimension is.
SIZES = {"batch": (1, 2), "image": (224, 160), "sequence": (16, 11), "other": (8, 5)}
_BATCH_NAMES = ("batch", "n", "b", "bs", "batch_size", "n_batch")
_SEQUENCE_WORDS = ("seq", "len", "token", "time", "step", "sentence")


@dataclass(frozen=True)
class GraphInput:
    name: str
    elem_type: int
    # A fixed size, the name of a symbolic dimension, or None for an unnamed one.
    dims: tuple[int | str | None, ...]

    @property
    def dtype(self) -> Any:
        return ONNX_DTYPES[self.elem_type]

    def dim_key(self, axis: int) -> str:
        """One key per symbolic dimension: its name, or (unnamed) what it is at this axis, so
        an input_ids and an attention_mask of the same unnamed [batch, seq] agree."""
        dim = self.dims[axis]
        return dim if isinstance(dim, str) and dim else f"?{self.role(axis)}@{axis}"

    def role(self, axis: int) -> str:
        dim = self.dims[axis]
        name = dim.lower() if isinstance(dim, str) else ""
        floating = np.issubdtype(self.dtype, np.floating)
        if name in _BATCH_NAMES:
            return "batch"
        if any(word in name for word in _SEQUENCE_WORDS):
            return "sequence"
        if axis == 0 and len(self.dims) > 1:
            return "batch"
        if floating and len(self.dims) == 4 and axis >= 2:
            return "image"
        if not floating and axis == len(self.dims) - 1:
            return "sequence"
        return "other"


def graph_inputs(proto: Any, where: str = "the graph") -> list[GraphInput]:
    """The graph's real inputs (older exporters also list initializers as inputs)."""
    initializers = {t.name for t in proto.graph.initializer}
    found = []
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        if not value.type.HasField("tensor_type") or tensor_type.elem_type not in ONNX_DTYPES:
            kind = tensor_type.elem_type if value.type.HasField("tensor_type") else value.type.WhichOneof("value")
            raise UnsupportedError(f"{where}: input {value.name} has ONNX type {kind}; edgec feeds float, integer and bool tensors")
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim)
        found.append(GraphInput(value.name, tensor_type.elem_type, dims))
    return found


def fix_shapes(proto: Any, spec: InputsSpec, where: str) -> list[GraphInput]:
    """Write the user's shapes and dimension sizes into the graph's inputs (and outputs that
    share a dimension's name), refusing names the graph does not have and sizes it fixes
    otherwise. Returns the inputs as they now are."""
    inputs = {i.name: i for i in graph_inputs(proto, where)}
    for name, shape in spec.shapes.items():
        known = inputs.get(name)
        if known is None:
            raise BadInputError(f"{where}: --input-shape names {name!r}, which is not an input; its inputs: {', '.join(inputs)}")
        if len(shape) != len(known.dims):
            raise BadInputError(f"{where}: --input-shape {name}={'x'.join(map(str, shape))} has {len(shape)} dimensions; "
                                f"{name} has {len(known.dims)} ({_show(known.dims)})")
        for axis, (size, declared) in enumerate(zip(shape, known.dims)):
            if isinstance(declared, int) and declared != size:
                raise BadInputError(f"{where}: --input-shape {name}: axis {axis} is fixed at {declared} in the graph, not {size}")
    symbols = {d for i in inputs.values() for d in i.dims if isinstance(d, str) and d}
    for dim in spec.dims:
        if dim not in symbols:
            names = ", ".join(sorted(symbols)) or "none (give whole shapes with --input-shape)"
            raise BadInputError(f"{where}: --dim {dim}: the graph has no symbolic dimension of that name; its symbolic dimensions: {names}")
    # A named dimension fixed in one input's shape is fixed everywhere it appears.
    sizes = dict(spec.dims)
    for name, shape in spec.shapes.items():
        for size, declared in zip(shape, inputs[name].dims):
            if isinstance(declared, str) and declared:
                if sizes.setdefault(declared, size) != size:
                    raise BadInputError(f"{where}: --input-shape {name} makes dimension {declared} {size}, "
                                        f"but another shape or --dim makes it {sizes[declared]}")

    def rewrite(value: Any, shape: list[int] | None) -> None:
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            size = shape[axis] if shape is not None else sizes.get(dim.dim_param) if dim.HasField("dim_param") else None
            if size is not None:
                dim.Clear()
                dim.dim_value = int(size)

    for value in proto.graph.input:
        if value.name in inputs:
            rewrite(value, spec.shapes.get(value.name))
    for value in proto.graph.output:
        rewrite(value, None)
    return graph_inputs(proto, where)


def _show(dims: tuple[int | str | None, ...]) -> str:
    return "x".join(str(d) if d is not None else "?" for d in dims)


def symbolic(inputs: list[GraphInput]) -> bool:
    return any(not isinstance(d, int) for i in inputs for d in i.dims)


def sizes_for(inputs: list[GraphInput], which: int) -> dict[str, int]:
    """Each symbolic dimension's size (`which` 0: the first reference run, 1: the second)."""
    sizes: dict[str, int] = {}
    for graph_input in inputs:
        for axis, dim in enumerate(graph_input.dims):
            if not isinstance(dim, int):
                sizes.setdefault(graph_input.dim_key(axis), SIZES[graph_input.role(axis)][which])
    return sizes


def _embedding_rows(proto: Any) -> dict[str, int]:
    """Input name -> rows of the embedding table it indexes (Gather on a weight), followed
    through ops that keep values (a Cast to int64, an Unsqueeze)."""
    weights = {t.name: list(t.dims) for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            weights[node.output[0]] = list(node.attribute[0].t.dims)
    consumers: dict[str, list[Any]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    rows: dict[str, int] = {}
    for graph_input in proto.graph.input:
        frontier, seen = [graph_input.name], set()
        while frontier and graph_input.name not in rows:
            value = frontier.pop()
            seen.add(value)
            for node in consumers.get(value, []):
                if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == value and node.input[0] in weights:
                    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                    shape = weights[node.input[0]]
                    if shape:
                        rows[graph_input.name] = int(shape[axis])
                        break
                if node.op_type in _VALUE_PRESERVING:
                    frontier.extend(o for o in node.output[:1] if o not in seen)
    return rows


def make_inputs(proto: Any, inputs: list[GraphInput], sizes: dict[str, int], seed: int) -> list[np.ndarray]:
    """Realistic inputs for the graph at these dimension sizes (see the module's docstring)."""
    rng = np.random.default_rng(seed)
    rows = _embedding_rows(proto)
    made = []
    for graph_input in inputs:
        shape = tuple(d if isinstance(d, int) else sizes[graph_input.dim_key(a)] for a, d in enumerate(graph_input.dims))
        lowered = graph_input.name.lower()
        dtype = graph_input.dtype
        if dtype == np.bool_ or "mask" in lowered:
            value = np.ones(shape, dtype=dtype)
        elif np.issubdtype(dtype, np.floating):
            value = rng.standard_normal(shape).astype(dtype)
        elif graph_input.name in rows:
            value = rng.integers(0, rows[graph_input.name], size=shape).astype(dtype)
        elif "token_type" in lowered or "segment" in lowered:
            value = np.zeros(shape, dtype=dtype)
        elif "position" in lowered and shape:
            value = np.broadcast_to(np.arange(shape[-1]), shape).astype(dtype)
        else:
            value = np.ones(shape, dtype=dtype)
        made.append(np.asarray(value, order="C"))
    return made


def read_inputs(path: str, inputs: list[GraphInput]) -> list[np.ndarray]:
    """The user's reference inputs (--reference-inputs FILE.npz), checked against the graph."""
    source = Path(path).expanduser()
    try:
        with np.load(source, allow_pickle=False) as data:
            given = {name: data[name] for name in data.files}
    except (OSError, ValueError) as exc:
        raise BadInputError(f"--reference-inputs {path}: not a readable .npz of input arrays ({exc}); "
                            "write one with numpy.savez(FILE, name=array, ...)") from None
    missing = [i.name for i in inputs if i.name not in given]
    if missing:
        raise BadInputError(f"--reference-inputs {path} lacks {', '.join(missing)}; it holds {', '.join(given) or 'nothing'}")
    arrays = []
    for graph_input in inputs:
        value = given[graph_input.name]
        if len(value.shape) != len(graph_input.dims) or any(
            isinstance(d, int) and d != s for d, s in zip(graph_input.dims, value.shape)
        ):
            raise BadInputError(f"--reference-inputs {path}: {graph_input.name} is {list(value.shape)}; "
                                f"the graph takes {_show(graph_input.dims)}")
        if not np.can_cast(value.dtype, graph_input.dtype, casting="same_kind"):
            raise BadInputError(f"--reference-inputs {path}: {graph_input.name} is {value.dtype}; the graph takes "
                                f"{np.dtype(graph_input.dtype)}")
        arrays.append(np.asarray(value.astype(graph_input.dtype), order="C"))
    return arrays


def sizes_of(inputs: list[GraphInput], arrays: list[np.ndarray]) -> dict[str, int]:
    """The symbolic dimensions' sizes in given inputs (a second run must differ from them)."""
    return {i.dim_key(a): int(x.shape[a]) for i, x in zip(inputs, arrays) for a, d in enumerate(i.dims) if not isinstance(d, int)}
