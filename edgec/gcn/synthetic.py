"""Synthetic graphs of any size: a degree-corrected stochastic block model.

Blocks are the classes. Each undirected edge picks its first end in proportion to the node
weights and its second, with probability `intra`, among the same block's nodes (else among
all), again by weight. Uniform weights give a plain SBM; weights i^(-1/(gamma-1)) give a
power-law degree distribution (Chung-Lu inside blocks). Features are a class mean plus noise,
so a GCN has something to learn that its neighbours make easier. Vectorised numpy: a million
nodes and ten million edges take about a minute on two cores.
"""

from __future__ import annotations

import numpy as np

from edgec.errors import BadInputError
from edgec.gcn.graph import Graph, split_masks


def block_model(nodes: int, classes: int = 8, average_degree: float = 10.0, intra: float = 0.8, power_law: float | None = None,
                features: int = 64, signal: float = 0.5, seed: int = 0) -> Graph:
    if nodes < 2 * classes:
        raise BadInputError(f"a block model of {nodes} nodes and {classes} classes: give at least 2 nodes per class")
    if not 0 <= intra <= 1 or average_degree <= 0 or features < 1:
        raise BadInputError("a block model needs 0 <= intra <= 1, average_degree > 0 and features >= 1")
    if power_law is not None and power_law <= 2:
        raise BadInputError(f"power-law exponent {power_law}: give gamma > 2 (the degree distribution's tail)")
    rng = np.random.default_rng(seed)
    # Generated with blocks contiguous, then relabelled by a random permutation.
    block = np.repeat(np.arange(classes), -(-nodes // classes))[:nodes]
    weight = np.ones(nodes) if power_law is None else rng.permutation(np.arange(1, nodes + 1) ** (-1.0 / (power_law - 1.0)))
    cumulative = np.cumsum(weight)
    starts = np.searchsorted(block, np.arange(classes))
    ends = np.append(starts[1:], nodes)
    before = np.concatenate([[0.0], cumulative])
    edges = int(round(nodes * average_degree / 2))
    first = np.searchsorted(cumulative, rng.random(edges) * cumulative[-1], side="right")
    same = rng.random(edges) < intra
    low, high = before[starts[block[first]]], before[ends[block[first]]]
    draw = rng.random(edges)
    anywhere = draw * cumulative[-1]
    second = np.searchsorted(cumulative, np.where(same, low + draw * (high - low), anywhere), side="right")
    first, second = np.minimum(first, nodes - 1), np.minimum(second, nodes - 1)
    keep = first != second
    relabel = rng.permutation(nodes)
    a, b = relabel[first[keep]], relabel[second[keep]]
    keys = np.unique(np.concatenate([b * nodes + a, a * nodes + b]))
    edge_index = np.stack([keys % nodes, keys // nodes]).astype(np.int64)
    labels = np.empty(nodes, dtype=np.int64)
    labels[relabel] = block
    means = rng.standard_normal((classes, features)).astype(np.float32)
    x = signal * means[labels] + rng.standard_normal((nodes, features), dtype=np.float32)
    train, val, test = split_masks(nodes, seed)
    kind = "sbm" if power_law is None else f"powerlaw{power_law:g}-sbm"
    return Graph(edge_index, x, labels, train, val, test, classes, [f"block {i}" for i in range(classes)],
                 f"{kind}-{nodes}")
