"""`edgec gcn plan`: how P workers share full-graph GCN training, and what they send.

Mixture of parallelism (MoP, MixGCN). Every worker holds the whole graph structure. The
aggregation A_hat H runs on *column* slices of H (worker p: every row, columns p of P), with
no communication and equal work; the update H W runs on *row* shards (worker q: its rows,
every column), W replicated. Switching between the two layouts is one all-to-all in which
worker p sends worker q the block [rows of q, columns of p]: N d - sum_p |rows_p| |cols_p|
elements in all, ~ N d (P-1)/P, whatever the partition of the graph. Since
A_hat (H W) = (A_hat H) W, each layer may aggregate first or transform first; the plan
chooses orders and layouts (input features are read in either layout; the loss needs rows)
to switch the fewest elements. A switch repeats in the backward pass, mirrored, when the
switched tensor depends on a parameter.

The fine-grained pipeline splits each row shard into `chunks`; chunk c of every shard is
switched by its own all-to-all, so the all-to-all of chunk c is in flight while chunk c+1 is
aggregated (or updated). Nodes are renumbered so that every (worker, chunk) block holds the
same number of nodes and nearly the same number of edges (nodes dealt by degree,
boustrophedon), which balances the chunks of the pipeline and the per-worker aggregation
slices alike. The numbering is chunk-major: block (chunk c, worker p) holds consecutive ids,
blocks ordered by c then p, so a chunk is one contiguous range of rows in the column layout
and the all-to-all of chunk c sends contiguous pieces.

Partition parallelism (the baseline): METIS (pymetis) cuts the graph into P parts; worker p
owns its part's rows for both steps and receives, per layer, the rows of its halo (nodes
outside p with an edge into p) at the aggregated width: d * sum_p |halo_p| elements, which
grows with P.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edgec.errors import BadInputError
from edgec.gcn.graph import Graph
from edgec.gcn.model import GCNConfig, normalized_edges

PLAN_KIND = "edgec-gcn-plan"
ELEMENT_BYTES = 4  # float32 activations and gradients
Layout = Literal["columns", "rows"]


def sizes(total: int, parts: int) -> list[int]:
    """`total` split into `parts` contiguous pieces whose sizes differ by at most one."""
    return [total // parts + (1 if p < total % parts else 0) for p in range(parts)]


def bounds(counts: list[int]) -> list[tuple[int, int]]:
    ends = np.cumsum(counts).tolist()
    return [(int(e - c), int(e)) for c, e in zip(counts, ends)]


def switch_elements(rows: list[int], width: int) -> int:
    """Elements one worker sends another in a rows <-> columns switch, summed over all pairs."""
    columns = sizes(width, len(rows))
    return sum(rows) * width - sum(r * c for r, c in zip(rows, columns))


class Switch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    at: str = Field(description="what is switched, e.g. 'A H (before H W)'")
    to: Layout
    width: int
    elements: int
    backward: bool = Field(description="whether its gradient is switched back in the backward pass")


class LayerPlan(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layer: int
    d_in: int
    d_out: int
    order: Literal["aggregate-first", "transform-first"]
    input_layout: Layout
    output_layout: Layout
    switches: list[Switch]
    forward_elements: int
    backward_elements: int


class PartitionLayer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layer: int
    width: int
    forward_elements: int
    backward_elements: int


class PartitionPlan(BaseModel):
    """The partition-parallel baseline on the same graph and P, for comparison."""

    model_config = ConfigDict(extra="forbid")
    method: str
    part_sizes: list[int]
    halo_sizes: list[int]
    edge_cut: int
    layers: list[PartitionLayer]
    aggregation_balance: float
    update_balance: float


class Plan(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["edgec-gcn-plan"] = PLAN_KIND
    schema_version: int = 2
    world_size: int
    chunks: int
    graph: str
    graph_sha256: str
    num_nodes: int
    num_edges: int
    widths: list[int]
    self_loops: bool
    node_order_sha256: str = Field(description="sha256 of the renumbering (int64), recomputed from the graph when run")
    chunk_rows: list[list[int]] = Field(description="rows per [worker][chunk]; ids are numbered chunk-major (see block_bounds)")
    layers: list[LayerPlan]
    final_switch: Switch | None
    gradient_allreduce_elements: int = Field(description="weights and biases, all-reduced once per step (per worker)")
    aggregation_balance: float = Field(description="max / mean of edges x columns aggregated per worker")
    update_balance: float = Field(description="max / mean of rows updated per worker")
    partition: PartitionPlan | None = None

    def forward_elements(self) -> int:
        return sum(layer.forward_elements for layer in self.layers) + (self.final_switch.elements if self.final_switch else 0)

    def backward_elements(self) -> int:
        final = self.final_switch.elements if self.final_switch and self.final_switch.backward else 0
        return sum(layer.backward_elements for layer in self.layers) + final

    def check_for(self, graph: Graph, world_size: int, where: str) -> None:
        if self.world_size != world_size:
            raise BadInputError(f"{where}: planned for {self.world_size} workers, not {world_size}; "
                                f"make a plan for P = {world_size} (`edgec gcn plan ... --world-size {world_size}`)")
        if self.graph_sha256 != graph.sha256():
            raise BadInputError(f"{where}: planned for the graph {self.graph} ({self.graph_sha256[:12]}), not {graph.name} "
                                f"({graph.sha256()[:12]}); make a plan for this graph")


# ----------------------------------------------------------------------------- node order
def node_order(graph: Graph, world_size: int, chunks: int, self_loops: bool) -> tuple[np.ndarray, list[list[int]]]:
    """(order, rows per worker and chunk): order[new] = old node id. Nodes sorted by degree
    (stable) are dealt to the world_size x chunks blocks back and forth, so that blocks differ
    by at most one node and their edge counts are close."""
    _, target, _ = normalized_edges(graph.edge_index, graph.num_nodes, self_loops)
    degree = np.bincount(target, minlength=graph.num_nodes)
    by_degree = np.argsort(-degree, kind="stable")
    bins = world_size * chunks
    rounds = np.arange(graph.num_nodes) // bins
    position = np.arange(graph.num_nodes) % bins
    block = np.where(rounds % 2 == 0, position, bins - 1 - position)
    # Block b is (chunk b // world_size, worker b % world_size): chunk-major ids. Stable by
    # block: within a block nodes keep their degree order.
    order = by_degree[np.argsort(block, kind="stable")]
    counts = np.bincount(block, minlength=bins)
    return order.astype(np.int64), counts.reshape(chunks, world_size).T.tolist()


def block_bounds(chunk_rows: list[list[int]]) -> list[list[tuple[int, int]]]:
    """[worker][chunk] -> [start, end) of the block, blocks numbered chunk-major."""
    world_size, chunks = len(chunk_rows), len(chunk_rows[0])
    flat = [chunk_rows[p][c] for c in range(chunks) for p in range(world_size)]
    spans = bounds(flat)
    return [[spans[c * world_size + p] for c in range(chunks)] for p in range(world_size)]


def order_sha256(order: np.ndarray) -> str:
    return hashlib.sha256(order.astype(np.int64).tobytes()).hexdigest()


# ----------------------------------------------------------------------------- MoP
def _layer_options(d_in: int, d_out: int, first: bool, rows: list[int]) -> list[tuple[str, Layout, Layout, list[Switch]]]:
    """(order, input layout, output layout, switches) for one layer. Aggregation needs
    columns, the update rows; in the first layer nothing before the update needs a gradient."""
    options = []
    for start in ("columns", "rows"):
        for order in ("aggregate-first", "transform-first"):
            switches: list[Switch] = []
            layout: Layout = start  # type: ignore[assignment]
            grad = not first  # whether the tensor at hand depends on a parameter
            # (step, the tensor it reads, its width)
            steps = ([("aggregation", "H", d_in), ("update", "A H", d_in)] if order == "aggregate-first"
                     else [("update", "H", d_in), ("aggregation", "H W", d_out)])
            for step, tensor, width in steps:
                need: Layout = "columns" if step == "aggregation" else "rows"
                if layout != need:
                    switches.append(Switch(at=f"{tensor} (before the {step})", to=need, width=width,
                                           elements=switch_elements(rows, width), backward=grad))
                    layout = need
                if step == "update":
                    grad = True
            for end in ("columns", "rows"):
                extra = [] if end == layout else [Switch(at="layer output", to=end, width=d_out,  # type: ignore[arg-type]
                                                         elements=switch_elements(rows, d_out), backward=True)]
                options.append((order, start, end, switches + extra))  # type: ignore[arg-type]
    return options


def mop_layers(widths: list[int], rows: list[int]) -> tuple[list[LayerPlan], Switch | None]:
    """The orders and layouts that switch the fewest elements, forward plus backward (the
    input's layout is free; the loss reads rows). Ties: fewer switches, then aggregate-first."""
    layers = len(widths) - 1
    best: dict[str, tuple[tuple[int, int], list[LayerPlan]]] = {"columns": ((0, 0), []), "rows": ((0, 0), [])}
    for index in range(layers):
        d_in, d_out = widths[index], widths[index + 1]
        step: dict[str, tuple[tuple[int, int], list[LayerPlan]]] = {}
        for order, start, end, switches in _layer_options(d_in, d_out, index == 0, rows):
            (cost, count), plans = best[start]
            forward = sum(s.elements for s in switches)
            backward = sum(s.elements for s in switches if s.backward)
            total = (cost + forward + backward, count + len(switches))
            plan = LayerPlan(layer=index, d_in=d_in, d_out=d_out, order=order, input_layout=start, output_layout=end,  # type: ignore[arg-type]
                             switches=switches, forward_elements=forward, backward_elements=backward)
            if end not in step or total < step[end][0]:
                step[end] = (total, [*plans, plan])
        best = step
    with_final = {"rows": (best["rows"][0], None)}
    final = Switch(at="logits (for the loss)", to="rows", width=widths[-1], elements=switch_elements(rows, widths[-1]), backward=True)
    with_final["columns"] = ((best["columns"][0][0] + 2 * final.elements, best["columns"][0][1] + 1), final)  # type: ignore[assignment]
    layout = min(with_final, key=lambda k: with_final[k][0])
    return best[layout][1], with_final[layout][1]


def mop_plan(graph: Graph, config: GCNConfig, world_size: int, chunks: int = 1, partition: bool = True) -> Plan:
    if world_size < 1:
        raise BadInputError(f"--world-size {world_size}: give at least 1 worker")
    if chunks < 1:
        raise BadInputError(f"--chunks {chunks}: give at least 1 chunk")
    if world_size * chunks > graph.num_nodes:
        raise BadInputError(f"--world-size {world_size} x --chunks {chunks} is more than the {graph.num_nodes} nodes of "
                            f"{graph.name}; use fewer workers or chunks")
    if config.in_features != graph.features.shape[1]:
        raise BadInputError(f"the model reads {config.in_features} features, {graph.name} has {graph.features.shape[1]}")
    order, chunk_rows = node_order(graph, world_size, chunks, config.self_loops)
    rows = [sum(c) for c in chunk_rows]
    widths = config.widths()
    layers, final = mop_layers(widths, rows)
    _, target, _ = normalized_edges(graph.edge_index, graph.num_nodes, config.self_loops)
    aggregated = [len(target) * sum(sizes(layer.d_in if layer.order == "aggregate-first" else layer.d_out, world_size)[p]
                                    for layer in layers) for p in range(world_size)]
    parameters = sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))
    plan = Plan(world_size=world_size, chunks=chunks, graph=graph.name, graph_sha256=graph.sha256(), num_nodes=graph.num_nodes,
                num_edges=graph.num_edges, widths=widths, self_loops=config.self_loops, node_order_sha256=order_sha256(order),
                chunk_rows=chunk_rows, layers=layers, final_switch=final,
                gradient_allreduce_elements=parameters,
                aggregation_balance=max(aggregated) / (sum(aggregated) / world_size) if sum(aggregated) else 1.0,
                update_balance=max(rows) / (sum(rows) / world_size))
    if partition:
        plan.partition = partition_plan(graph, config, world_size)
    return plan


# ----------------------------------------------------------------------------- partition parallelism
def metis_parts(graph: Graph, world_size: int) -> np.ndarray:
    """Part of each node (METIS k-way on the undirected, loop-free graph)."""
    if world_size == 1:
        return np.zeros(graph.num_nodes, dtype=np.int64)
    import pymetis

    a, b = graph.edge_index
    keep = a != b
    keys = np.unique(np.concatenate([a[keep] * graph.num_nodes + b[keep], b[keep] * graph.num_nodes + a[keep]]))
    source, target = keys // graph.num_nodes, keys % graph.num_nodes
    xadj = np.concatenate([[0], np.cumsum(np.bincount(source, minlength=graph.num_nodes))])
    _, parts = pymetis.part_graph(world_size, pymetis.CSRAdjacency(xadj, target))
    return np.asarray(parts, dtype=np.int64)


def halo_sizes(graph: Graph, parts: np.ndarray, world_size: int) -> list[int]:
    """|halo_p|: nodes outside part p with an edge into p (their rows are received each layer)."""
    source, target = graph.edge_index
    crossing = parts[source] != parts[target]
    pairs = np.unique(parts[target[crossing]] * graph.num_nodes + source[crossing])
    return np.bincount(pairs // graph.num_nodes, minlength=world_size).tolist()


def partition_plan(graph: Graph, config: GCNConfig, world_size: int, parts: np.ndarray | None = None) -> PartitionPlan:
    parts = metis_parts(graph, world_size) if parts is None else parts
    halos = halo_sizes(graph, parts, world_size)
    widths = config.widths()
    layers = []
    for index, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
        aggregate_first = d_in <= d_out
        width = d_in if aggregate_first else d_out
        forward = width * sum(halos)
        # The first layer's aggregated input (the features) needs no gradient.
        backward = 0 if index == 0 and aggregate_first else forward
        layers.append(PartitionLayer(layer=index, width=width, forward_elements=forward, backward_elements=backward))
    _, target, _ = normalized_edges(graph.edge_index, graph.num_nodes, config.self_loops)
    edges = np.bincount(parts[target], minlength=world_size)
    nodes = np.bincount(parts, minlength=world_size)
    source_parts = parts[graph.edge_index[0]] != parts[graph.edge_index[1]]
    return PartitionPlan(method="metis" if world_size > 1 else "single", part_sizes=nodes.tolist(), halo_sizes=halos,
                         edge_cut=int(source_parts.sum()) // 2, layers=layers,
                         aggregation_balance=float(edges.max() / edges.mean()), update_balance=float(nodes.max() / nodes.mean()))


# ----------------------------------------------------------------------------- files
def write_plan(plan: Plan, path: Path) -> None:
    import os
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        handle.write(plan.model_dump_json(indent=1) + "\n")
    os.replace(tmp, path)


def read_plan(path: Path) -> Plan:
    from pydantic import ValidationError

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BadInputError(f"--plan {path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict) or data.get("kind") != PLAN_KIND:
        raise BadInputError(f"--plan {path}: not an edgec GCN plan (make one with `edgec gcn plan`)")
    try:
        return Plan.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise BadInputError(f"--plan {path}: {'.'.join(str(p) for p in error['loc'])}: {error['msg']}") from None
