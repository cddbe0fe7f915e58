"""Full-graph GCN training in one process: the reference every distributed plan must
reproduce (same seed, same initial weights, same dropout masks, Adam)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from edgec.gcn.graph import Graph
from edgec.gcn.model import GCN, GCNConfig, SparseAdjacency, dropout_masks, normalized_edges


class TrainOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(200, ge=1)
    lr: float = Field(0.01, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    seed: int = 0


def initial_model(config: GCNConfig, seed: int) -> GCN:
    torch.manual_seed(seed)
    return GCN(config)


def accuracy(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> float:
    return float((logits[mask].argmax(-1) == labels[mask]).float().mean()) if bool(mask.any()) else float("nan")


def evaluate(model: GCN, adjacency: SparseAdjacency, tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        logits = model.propagated(tensors["x"], adjacency)
    labels = tensors["labels"]
    return {f"{split}_acc": accuracy(logits, labels, tensors[f"{split}_mask"]) for split in ("train", "val", "test")}


def graph_tensors(graph: Graph, self_loops: bool) -> dict[str, torch.Tensor]:
    source, target, weight = normalized_edges(graph.edge_index, graph.num_nodes, self_loops)
    return {"x": torch.from_numpy(graph.features), "source": torch.from_numpy(source), "target": torch.from_numpy(target),
            "weight": torch.from_numpy(weight), "labels": torch.from_numpy(graph.labels),
            **{f"{s}_mask": torch.from_numpy(getattr(graph, f"{s}_mask")) for s in ("train", "val", "test")}}


def train_single(graph: Graph, config: GCNConfig, options: TrainOptions,
                 progress: Callable[[int, dict[str, float]], None] = lambda _e, _r: None) -> tuple[GCN, list[dict[str, Any]]]:
    model = initial_model(config, options.seed)
    tensors = graph_tensors(graph, config.self_loops)
    adjacency = SparseAdjacency(tensors["target"].numpy(), tensors["source"].numpy(), tensors["weight"].numpy(),
                                (graph.num_nodes, graph.num_nodes))
    optimizer = torch.optim.Adam(model.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    history: list[dict[str, Any]] = []
    train = tensors["train_mask"]
    for epoch in range(options.epochs):
        began = time.perf_counter()
        model.train()
        logits = model.propagated(tensors["x"], adjacency, dropout_masks(config, graph.num_nodes, options.seed, epoch))
        loss = F.cross_entropy(logits[train], tensors["labels"][train])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        trained = time.perf_counter() - began
        row = {"epoch": epoch + 1, "loss": float(loss), **evaluate(model, adjacency, tensors), "seconds": time.perf_counter() - began,
               "train_seconds": trained}
        history.append(row)
        progress(epoch + 1, row)
    return model.eval(), history
