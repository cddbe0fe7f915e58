"""Graph data for the GCN family: one `.npz` per graph, checked field by field when read.

Fields (numpy arrays):
  edge_index   int64 [2, E]  message edges source -> target (an undirected graph lists both)
  features     float32 [N, F]
  labels       int64 [N]     in 0 .. num_classes - 1
  train_mask, val_mask, test_mask   bool [N]
  num_classes  int64 []      (optional: max label + 1)
  class_names  str [C]       (optional)
`name` is the graph's name in messages and records (the file's stem when read).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgec.errors import BadInputError

MASKS = ("train_mask", "val_mask", "test_mask")


@dataclass
class Graph:
    edge_index: np.ndarray
    features: np.ndarray
    labels: np.ndarray
    train_mask: np.ndarray
    val_mask: np.ndarray
    test_mask: np.ndarray
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    name: str = "graph"

    @property
    def num_nodes(self) -> int:
        return int(self.features.shape[0])

    @property
    def num_edges(self) -> int:
        return int(self.edge_index.shape[1])

    def sha256(self) -> str:
        """The structure's hash (edges, labels, splits, feature shape): plans and trained models
        name the graph they were made for. Feature values are left out: a graph rebuilt on
        another CPU may differ from this one in the last bit of a float."""
        digest = hashlib.sha256(str(self.features.shape).encode())
        for array in (self.edge_index, self.labels, self.train_mask, self.val_mask, self.test_mask):
            digest.update(str(array.shape).encode())
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()

    def describe(self) -> str:
        return (f"{self.name}: {self.num_nodes:,} nodes, {self.num_edges:,} edges, {self.features.shape[1]} features, "
                f"{self.num_classes} classes (train {int(self.train_mask.sum()):,} / val {int(self.val_mask.sum()):,} / "
                f"test {int(self.test_mask.sum()):,})")


def check(graph: Graph, where: str) -> Graph:
    """Refuses, naming `where` and the field, what would index out of bounds or train on nothing."""
    n = graph.features.shape[0] if graph.features.ndim == 2 else -1
    if graph.features.ndim != 2 or n < 1:
        raise BadInputError(f"{where}: features must be a 2-D array [nodes, features], got shape {list(graph.features.shape)}")
    if graph.edge_index.ndim != 2 or graph.edge_index.shape[0] != 2 or graph.edge_index.dtype.kind not in "iu":
        raise BadInputError(f"{where}: edge_index must be an integer array [2, edges], got {graph.edge_index.dtype} "
                            f"{list(graph.edge_index.shape)}")
    if graph.edge_index.size and (int(graph.edge_index.min()) < 0 or int(graph.edge_index.max()) >= n):
        bad = int(np.flatnonzero((graph.edge_index < 0).any(0) | (graph.edge_index >= n).any(0))[0])
        raise BadInputError(f"{where}: edge_index column {bad} ({graph.edge_index[0, bad]} -> {graph.edge_index[1, bad]}) is "
                            f"outside the {n} nodes that features has rows for")
    if graph.labels.shape != (n,) or graph.labels.dtype.kind not in "iu":
        raise BadInputError(f"{where}: labels must be {n} integers (one per feature row), got {graph.labels.dtype} "
                            f"{list(graph.labels.shape)}")
    if graph.labels.size and (int(graph.labels.min()) < 0 or int(graph.labels.max()) >= graph.num_classes):
        bad = int(np.flatnonzero((graph.labels < 0) | (graph.labels >= graph.num_classes))[0])
        raise BadInputError(f"{where}: labels[{bad}] = {graph.labels[bad]} is outside the {graph.num_classes} classes "
                            "(num_classes)")
    for name in MASKS:
        mask = getattr(graph, name)
        if mask.shape != (n,) or mask.dtype != np.bool_:
            raise BadInputError(f"{where}: {name} must be {n} booleans (one per feature row), got {mask.dtype} {list(mask.shape)}")
    if not graph.train_mask.any():
        raise BadInputError(f"{where}: train_mask selects no node; there is nothing to train on")
    return graph


def read_graph(path: Path) -> Graph:
    """A graph `.npz`, checked (BadInputError names the file and the field)."""
    if not path.is_file():
        raise BadInputError(f"{path}: no such graph file; give a .npz with edge_index, features, labels and the masks "
                            "(or make one: `edgec gcn graph wordnet -o G.npz`)")
    try:
        data = np.load(path, allow_pickle=False)
        arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{path}: not a readable .npz ({exc})") from None
    missing = [key for key in ("edge_index", "features", "labels", *MASKS) if key not in arrays]
    if missing:
        raise BadInputError(f"{path}: no field {missing[0]} (a graph .npz holds edge_index, features, labels, "
                            f"{', '.join(MASKS)})")
    labels = arrays["labels"]
    classes = int(arrays["num_classes"]) if "num_classes" in arrays else (int(labels.max()) + 1 if labels.size else 0)
    features = arrays["features"]
    graph = Graph(arrays["edge_index"], features.astype(np.float32) if features.dtype.kind == "f" else features, labels,
                  *(arrays[m] for m in MASKS), classes,
                  [str(s) for s in arrays["class_names"]] if "class_names" in arrays else [], path.stem)
    if graph.features.dtype.kind != "f":
        raise BadInputError(f"{path}: features must be floating point, got {features.dtype}")
    check(graph, str(path))
    graph.edge_index = graph.edge_index.astype(np.int64)
    graph.labels = graph.labels.astype(np.int64)
    return graph


def graph_path(spec: str, progress: Callable[[str], None] = lambda _m: None) -> Path:
    """A graph argument: a .npz path, or `zoo:wordnet` (the WordNet noun graph, built once
    from Debian's wordnet-base into the cache: 64 SVD features, split seed 0)."""
    if not spec.startswith("zoo:"):
        return Path(spec).expanduser()
    if spec != "zoo:wordnet":
        raise BadInputError(f"{spec}: the built-in graph is zoo:wordnet; give it or a .npz path")
    from edgec.cache import cached_dir

    def build(tmp: Path) -> None:
        from edgec.gcn.wordnet import wordnet_graph

        progress("zoo:wordnet: building the WordNet noun graph once (about a minute)")
        write_graph(wordnet_graph(64, 0, progress), tmp / "wordnet.npz")

    return cached_dir("graphs", "wordnet-64-0", build) / "wordnet.npz"


def write_graph(graph: Graph, path: Path) -> None:
    """Written to a temporary sibling and renamed: a reader never sees half a graph."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {
        "edge_index": graph.edge_index.astype(np.int64), "features": graph.features.astype(np.float32),
        "labels": graph.labels.astype(np.int64), **{m: getattr(graph, m) for m in MASKS},
        "num_classes": np.int64(graph.num_classes),
    }
    if graph.class_names:
        arrays["class_names"] = np.array(graph.class_names)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.npz", dir=path.parent)
    os.close(fd)
    try:
        np.savez_compressed(tmp, **arrays)  # type: ignore[arg-type]
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def split_masks(num_nodes: int, seed: int, train: float = 0.5, val: float = 0.25) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded random train / val / test masks (the rest is test)."""
    order = np.random.default_rng(seed).permutation(num_nodes)
    masks = [np.zeros(num_nodes, dtype=bool) for _ in range(3)]
    cut_train, cut_val = int(round(train * num_nodes)), int(round((train + val) * num_nodes))
    masks[0][order[:cut_train]] = True
    masks[1][order[cut_train:cut_val]] = True
    masks[2][order[cut_val:]] = True
    return masks[0], masks[1], masks[2]
