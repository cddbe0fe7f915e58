"""The GCN model: H' = act(A_hat H W + b), A_hat = D^-1/2 (A + I) D^-1/2, as PyTorch
Geometric's `GCN` / `GCNConv` compute it, with the aggregation written as index_select +
index_add (a segment sum over edges): that form exports to ONNX and TVM, where torch.sparse
does not.

A model directory holds `config.json` (model_type "edgec-gcn") and `model.safetensors` whose
names are PyG's (`convs.{i}.lin.weight`, `convs.{i}.bias`), so a PyG `GCN` state dict loads
as it is.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from edgec.errors import BadInputError

MODEL_TYPE = "edgec-gcn"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"


class GCNConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_type: Literal["edgec-gcn"] = MODEL_TYPE
    in_features: int = Field(ge=1)
    hidden: int = Field(ge=1)
    num_layers: int = Field(ge=1)
    num_classes: int = Field(ge=2)
    dropout: float = Field(0.5, ge=0, lt=1)
    self_loops: bool = True
    graph: str | None = Field(None, description="name of the graph it was trained on")
    graph_sha256: str | None = None

    def widths(self) -> list[int]:
        """Feature width into each layer, then the output width: [in, hidden, ..., classes]."""
        return [self.in_features, *[self.hidden] * (self.num_layers - 1), self.num_classes]


def normalized_edges(edge_index: np.ndarray, num_nodes: int, self_loops: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source, target, weight) of A_hat's non-zeros: PyG's gcn_norm (flow source -> target,
    degree counted at the target; with self loops, the graph's own loops are replaced by one
    of weight 1 per node)."""
    source, target = edge_index[0].astype(np.int64), edge_index[1].astype(np.int64)
    if self_loops:
        keep = source != target
        nodes = np.arange(num_nodes, dtype=np.int64)
        source, target = np.concatenate([source[keep], nodes]), np.concatenate([target[keep], nodes])
    degree = np.bincount(target, minlength=num_nodes).astype(np.float64)
    inverse_root = np.where(degree > 0, 1.0 / np.sqrt(np.maximum(degree, 1.0)), 0.0)
    weight = (inverse_root[source] * inverse_root[target]).astype(np.float32)
    return source, target, weight


def aggregate(x: torch.Tensor, source: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A_hat @ x as a segment sum over the edges: the form that exports."""
    messages = x.index_select(0, source) * weight.unsqueeze(1)
    return torch.zeros_like(x).index_add(0, target, messages)


class _SpMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, adjacency: SparseAdjacency) -> torch.Tensor:  # type: ignore[override]
        ctx.adjacency = adjacency
        return adjacency.matrix @ x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return ctx.adjacency.transposed @ grad.contiguous(), None


class SparseAdjacency:
    """A block of A_hat as CSR (and its transpose, for the backward pass): what training
    aggregates with. torch's CSR matmul is an order of magnitude faster on CPU than the
    index_add form, which stays what export traces."""

    def __init__(self, rows: np.ndarray, columns: np.ndarray, weight: np.ndarray, shape: tuple[int, int]) -> None:
        index = torch.from_numpy(np.stack([rows, columns]).astype(np.int64))
        values = torch.from_numpy(weight.astype(np.float32))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse")  # torch's beta notice for CSR
            coo = torch.sparse_coo_tensor(index, values, shape).coalesce()
            self.matrix = coo.to_sparse_csr()
            self.transposed = coo.t().coalesce().to_sparse_csr()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _SpMM.apply(x, self)


class GCNLayer(nn.Module):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.lin = nn.Linear(in_features, out_features, bias=False)
        nn.init.xavier_uniform_(self.lin.weight)  # as PyG's GCNConv starts
        self.bias = nn.Parameter(torch.zeros(out_features))

    @property
    def aggregate_first(self) -> bool:
        # A (H W) = (A H) W: aggregate at the smaller of the two widths.
        return self.lin.in_features <= self.lin.out_features

    def forward(self, x: torch.Tensor, propagate: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """`propagate(h)` = A_hat h."""
        if self.aggregate_first:
            return self.lin(propagate(x)) + self.bias
        return propagate(self.lin(x)) + self.bias


class GCN(nn.Module):
    def __init__(self, config: GCNConfig) -> None:
        super().__init__()
        self.config = config
        widths = config.widths()
        self.convs = nn.ModuleList(GCNLayer(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, x: torch.Tensor, source: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                masks: list[torch.Tensor] | None = None) -> torch.Tensor:
        """`masks`: the scaled dropout masks after each hidden layer (training draws them with
        `dropout_masks`, so that every engine drops the same units); None in eval mode."""
        return self.propagated(x, lambda h: aggregate(h, source, target, weight), masks)

    def propagated(self, x: torch.Tensor, propagate: Callable[[torch.Tensor], torch.Tensor],
                   masks: list[torch.Tensor] | None = None) -> torch.Tensor:
        for index, conv in enumerate(self.convs):
            x = conv(x, propagate)
            if index < len(self.convs) - 1:
                x = torch.relu(x)
                if masks is not None:
                    x = x * masks[index]
        return x


def dropout_masks(config: GCNConfig, num_nodes: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """Scaled keep masks [nodes, hidden] per hidden layer, in the graph's own node order,
    drawn from (seed, epoch, layer): a worker slices the rows or columns it holds."""
    masks = []
    for layer in range(config.num_layers - 1):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 1_009 + layer)
        keep = torch.rand(num_nodes, config.hidden, generator=generator) >= config.dropout
        masks.append(keep.float() / (1.0 - config.dropout))
    return masks


def config_from_state(state: dict[str, torch.Tensor], where: str, **fields: object) -> GCNConfig:
    """A PyG `GCN` state dict's shapes say the widths (`convs.{i}.lin.weight` [out, in])."""
    layers = sorted({int(key.split(".")[1]) for key in state if key.startswith("convs.")})
    if not layers or layers != list(range(len(layers))) or any(f"convs.{i}.lin.weight" not in state for i in layers):
        raise BadInputError(f"{where}: not a GCN state dict (expected convs.0.lin.weight, convs.0.bias, ... as PyG's GCN names them)")
    shapes = [tuple(state[f"convs.{i}.lin.weight"].shape) for i in layers]
    extra = sorted(set(state) - {f"convs.{i}.{p}" for i in layers for p in ("lin.weight", "bias")})
    if extra:
        raise BadInputError(f"{where}: {extra[0]} is not part of a plain GCN (norms, jumping knowledge and a final linear "
                            "are not supported)")
    for (out_a, _), (_, in_b) in zip(shapes[:-1], shapes[1:]):
        if out_a != in_b:
            raise BadInputError(f"{where}: layer widths do not chain ({shapes})")
    hidden = shapes[0][0]
    try:
        return GCNConfig(in_features=shapes[0][1], hidden=hidden, num_layers=len(shapes), num_classes=shapes[-1][0], **fields)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise BadInputError(f"{where}: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}") from None


def import_pyg(state_path: Path, out: Path, graph: Any | None = None) -> GCN:
    """A trained PyTorch Geometric `GCN` (its state dict: .safetensors, or a .pt read with
    weights_only=True, never unpickled) as a model directory, written to a temporary sibling
    and renamed."""
    import os
    import shutil
    import tempfile

    if not state_path.is_file():
        raise BadInputError(f"{state_path}: no such file; give a PyG GCN state dict (.pt from torch.save(model.state_dict()) "
                            "or .safetensors)")
    try:
        if state_path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(state_path))
        else:
            state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch and safetensors each raise their own kind
        raise BadInputError(f"{state_path}: not a readable state dict ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BadInputError(f"{state_path}: not a state dict of tensors; save the model with torch.save(model.state_dict(), PATH)")
    fields: dict[str, Any] = {} if graph is None else {"graph": graph.name, "graph_sha256": graph.sha256()}
    config = config_from_state(state, str(state_path), **fields)
    if graph is not None and graph.features.shape[1] != config.in_features:
        raise BadInputError(f"{state_path}: the model reads {config.in_features} features, {graph.name} has {graph.features.shape[1]}")
    model = GCN(config)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInputError(f"-o {out} exists and is not empty; choose another path")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_gcn(model, stage)
        if out.exists():
            out.rmdir()
        os.replace(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return model.eval()


def save_gcn(model: GCN, out: Path) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG).write_text(model.config.model_dump_json(indent=1) + "\n")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out / WEIGHTS))


def is_gcn_dir(path: Path) -> bool:
    if not (path / CONFIG).is_file():
        return False
    try:
        return json.loads((path / CONFIG).read_text()).get("model_type") == MODEL_TYPE
    except ValueError:
        return False


def gcn_model_dir(spec: str) -> Path:
    """A GCN model argument: a directory, or zoo:gcn-wordnet."""
    if spec.startswith("zoo:"):
        from edgec.zoo import zoo_path

        path = zoo_path(spec.removeprefix("zoo:"))
    else:
        path = Path(spec).expanduser()
    if not is_gcn_dir(path):
        raise BadInputError(f"{spec}: not a GCN model directory (config.json with model_type edgec-gcn); "
                            "`edgec gcn train` makes one, zoo:gcn-wordnet is built in")
    return path


def load_gcn(path: Path) -> GCN:
    from safetensors.torch import load_file

    try:
        config = GCNConfig.model_validate_json((path / CONFIG).read_text())
    except ValidationError as exc:
        error = exc.errors()[0]
        raise BadInputError(f"{path / CONFIG}: {'.'.join(str(p) for p in error['loc'])}: {error['msg']}") from None
    if not (path / WEIGHTS).is_file():
        raise BadInputError(f"{path}: no {WEIGHTS} beside its config.json")
    model = GCN(config)
    state = load_file(str(path / WEIGHTS))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise BadInputError(f"{path / WEIGHTS}: {'missing ' + missing[0] if missing else 'unexpected ' + unexpected[0]} "
                            f"for a {config.num_layers}-layer GCN of widths {config.widths()}")
    return model.eval()
