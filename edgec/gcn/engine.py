"""One worker of distributed full-graph GCN training, started by torchrun (or by `edgec gcn
train`, which launches torchrun's agent): `python -m edgec.gcn.engine SPEC.json`.

Every rank builds the same initial model from the seed, draws the same dropout masks, and
keeps the parameters replicated (gradients summed by one all-reduce per step, Adam on every
rank), so a run reproduces single-process training up to the order of float sums.

- `mop`: the plan's mixture of parallelism (edgec/gcn/plan.py): aggregation on column slices
  of every row, the update on the rank's row blocks, one all-to-all per layout switch and per
  pipeline chunk, launched asynchronously while the next chunk is computed.
- `partition`: METIS parts (computed once by the launcher), the halo exchanged per layer.

Rank 0 writes the checkpoint after every epoch (OUT.checkpoint/, by renames) and, at the end,
the model directory and train.json (history, bytes per rank per layer, waits, peak memory)
into the staging directory the launcher renames into place.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict

from edgec.gcn.comm import ChunkGeometry, Halo, Meter, all_reduce_gradients, exchange_halo, finish_switch, start_switch
from edgec.gcn.graph import Graph, read_graph
from edgec.gcn.model import GCN, GCNConfig, SparseAdjacency, dropout_masks, normalized_edges, save_gcn
from edgec.gcn.plan import Plan, block_bounds, node_order, order_sha256, read_plan, sizes
from edgec.gcn.train import TrainOptions, initial_model

EXIT_PEER_LOST = 75  # this rank stopped because another one did: not the culprit
CHECKPOINT = "checkpoint.pt"
PROGRESS = "progress.json"


class RunSpec(BaseModel):
    """What the launcher hands every worker (a JSON file)."""

    model_config = ConfigDict(extra="forbid")
    graph: str
    kind: Literal["mop", "partition"]
    plan: str
    parts: str | None = None
    config: GCNConfig
    options: TrainOptions
    stage: str
    checkpoint: str
    key: str
    resume: bool = False
    threads: int = 1


# ----------------------------------------------------------------------------- MoP
class MopRunner:
    """Rank p's share of the MoP plan: all rows of its column slices, its row blocks."""

    def __init__(self, graph: Graph, plan: Plan, config: GCNConfig, rank: int, meter: Meter) -> None:
        order, chunk_rows = node_order(graph, plan.world_size, plan.chunks, config.self_loops)
        if order_sha256(order) != plan.node_order_sha256 or chunk_rows != plan.chunk_rows:
            raise RuntimeError("the plan's node order differs from the one this graph gives")  # checked by the launcher
        self.plan, self.rank, self.meter, self.world = plan, rank, meter, plan.world_size
        blocks = block_bounds(chunk_rows)
        self.chunk_rows = [[chunk_rows[q][c] for q in range(self.world)] for c in range(plan.chunks)]  # [chunk][worker]
        self.chunk_spans = [(blocks[0][c][0], blocks[-1][c][1]) for c in range(plan.chunks)]
        self.mine = [torch.arange(*blocks[rank][c]) for c in range(plan.chunks)]
        self.my_rows = torch.cat(self.mine)
        self.order = torch.from_numpy(order)
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        source, target, weight = normalized_edges(graph.edge_index, graph.num_nodes, config.self_loops)
        source, target = inverse[source], inverse[target]
        # A_hat's rows of each chunk (every worker's block of it), all columns.
        self.adjacency = []
        for start, end in self.chunk_spans:
            inside = (target >= start) & (target < end)
            self.adjacency.append(SparseAdjacency(target[inside] - start, source[inside], weight[inside], (end - start, len(order))))
        self.features = torch.from_numpy(graph.features)[self.order]
        self.labels = torch.from_numpy(graph.labels)[self.order][self.my_rows]
        self.masks = {s: torch.from_numpy(getattr(graph, f"{s}_mask"))[self.order][self.my_rows] for s in ("train", "val", "test")}

    def columns(self, width: int) -> tuple[int, int]:
        counts = sizes(width, self.world)
        start = sum(counts[:self.rank])
        return start, start + counts[self.rank]

    def _geometry(self, chunk: int, width: int) -> ChunkGeometry:
        return ChunkGeometry(self.rank, self.chunk_rows[chunk], sizes(width, self.world))

    def _switch(self, pieces: Iterator[torch.Tensor], to: str, width: int, layer: int, what: str) -> list[torch.Tensor]:
        """Start each chunk's all-to-all as soon as the chunk is computed (the generator computes
        the next one meanwhile), then wait for them in order."""
        links = [start_switch(piece, to, self._geometry(c, width), self.meter, layer, what) for c, piece in enumerate(pieces)]
        return [finish_switch(token, link) for token, link in links]

    def _aggregate(self, pieces: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        """A_hat H on this rank's columns, one chunk of target rows at a time."""
        h = torch.cat(pieces)  # [N, columns]: sources may be anywhere
        for adjacency in self.adjacency:
            yield adjacency(h)

    def logits(self, model: GCN, masks: list[torch.Tensor] | None) -> torch.Tensor:
        """This rank's rows of the logits (in my_rows order)."""
        first = self.plan.layers[0].input_layout
        if first == "columns":
            pieces: list[torch.Tensor] = list(self.features[:, slice(*self.columns(self.features.shape[1]))].split(
                [end - start for start, end in self.chunk_spans]))
        else:
            pieces = [self.features[rows] for rows in self.mine]
        layout = first
        for index, (layer, conv) in enumerate(zip(self.plan.layers, model.convs)):
            switches = iter(layer.switches)
            stream: Iterator[torch.Tensor] = iter(pieces)
            steps = ("aggregation", "update") if layer.order == "aggregate-first" else ("update", "aggregation")
            for step in steps:
                need = "columns" if step == "aggregation" else "rows"
                if layout != need:
                    switch = next(switches)
                    stream = iter(self._switch(stream, need, switch.width, index, switch.at))
                    layout = need
                if step == "aggregation":
                    stream = self._aggregate(list(stream))
                else:
                    stream = (F.linear(piece, conv.lin.weight) for piece in stream)
            bias = conv.bias if layout == "rows" else conv.bias[slice(*self.columns(layer.d_out))]
            stream = (piece + bias for piece in stream)
            if layout != layer.output_layout:
                switch = next(switches)
                stream = iter(self._switch(stream, layer.output_layout, switch.width, index, switch.at))
                layout = layer.output_layout
            pieces = list(stream)
            if index < len(self.plan.layers) - 1:
                pieces = [torch.relu(piece) for piece in pieces]
                if masks is not None:
                    pieces = [piece * self._mask_piece(masks[index], layout, c) for c, piece in enumerate(pieces)]
        if layout == "columns":
            assert self.plan.final_switch is not None
            pieces = self._switch(iter(pieces), "rows", self.plan.final_switch.width, len(self.plan.layers), self.plan.final_switch.at)
        return torch.cat(pieces)

    def _mask_piece(self, mask: torch.Tensor, layout: str, chunk: int) -> torch.Tensor:
        if layout == "rows":
            return mask[self.order[self.mine[chunk]]]
        start, end = self.chunk_spans[chunk]
        return mask[self.order[start:end]][:, slice(*self.columns(mask.shape[1]))]


# ----------------------------------------------------------------------------- partition parallelism
class PartitionRunner:
    """Rank p owns the nodes of METIS part p; per layer it receives its halo's rows."""

    def __init__(self, graph: Graph, parts: np.ndarray, config: GCNConfig, rank: int, world: int, meter: Meter) -> None:
        self.meter = meter
        n = graph.num_nodes
        own = np.flatnonzero(parts == rank)
        source, target, weight = normalized_edges(graph.edge_index, n, config.self_loops)
        crossing = parts[source] != parts[target]
        # (receiving part, node) pairs, sorted by part then node id: every halo row once.
        pairs = np.unique(parts[target[crossing]] * n + source[crossing])
        receiver, node = pairs // n, pairs % n
        local = np.full(n, -1, dtype=np.int64)
        local[own] = np.arange(len(own))
        mine = node[receiver == rank]
        halo = mine[np.lexsort((mine, parts[mine]))]  # by owner, then id: the order owners send in
        local[halo] = len(own) + np.arange(len(halo))
        self.halo = Halo(send=[torch.from_numpy(local[node[(receiver == q) & (parts[node] == rank)]]) for q in range(world)],
                         receive=np.bincount(parts[halo], minlength=world).tolist())
        inside = parts[target] == rank
        self.adjacency = SparseAdjacency(local[target[inside]], local[source[inside]], weight[inside], (len(own), len(own) + len(halo)))
        self.rows = len(own)
        self.own = torch.from_numpy(own)
        self.features = torch.from_numpy(graph.features)[self.own]
        self.labels = torch.from_numpy(graph.labels)[self.own]
        self.masks = {s: torch.from_numpy(getattr(graph, f"{s}_mask"))[self.own] for s in ("train", "val", "test")}

    def _aggregate(self, h: torch.Tensor) -> torch.Tensor:
        return self.adjacency(h)

    def logits(self, model: GCN, masks: list[torch.Tensor] | None) -> torch.Tensor:
        h = self.features
        for index, conv in enumerate(model.convs):
            if conv.aggregate_first:
                h = F.linear(self._aggregate(exchange_halo(h, self.halo, self.meter, index)), conv.lin.weight) + conv.bias
            else:
                h = self._aggregate(exchange_halo(F.linear(h, conv.lin.weight), self.halo, self.meter, index)) + conv.bias
            if index < len(model.convs) - 1:
                h = torch.relu(h)
                if masks is not None:
                    h = h * masks[index][self.own]
        return h


# ----------------------------------------------------------------------------- the loop
def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _write_atomically(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def run(spec: RunSpec) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(spec.threads)
    graph = read_graph(Path(spec.graph))
    plan = read_plan(Path(spec.plan))
    if world != plan.world_size:
        raise SystemExit(f"{spec.plan}: planned for {plan.world_size} workers, torchrun started {world}; "
                         f"give --nproc-per-node (times --nnodes) = {plan.world_size}")
    meter = Meter()
    runner: MopRunner | PartitionRunner
    if spec.kind == "mop":
        runner = MopRunner(graph, plan, spec.config, rank, meter)
    else:
        assert spec.parts is not None
        runner = PartitionRunner(graph, np.load(spec.parts), spec.config, rank, world, meter)
    model = initial_model(spec.config, spec.options.seed)
    parameters = list(model.parameters())
    optimizer = torch.optim.Adam(parameters, lr=spec.options.lr, weight_decay=spec.options.weight_decay)
    checkpoint = Path(spec.checkpoint)
    history: list[dict[str, Any]] = []
    communication: list[dict[str, Any]] = []
    start = 0
    if spec.resume:
        saved = torch.load(checkpoint / CHECKPOINT, weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        progress = json.loads((checkpoint / PROGRESS).read_text())
        start, history, communication = int(saved["epoch"]), progress["history"], progress["communication"]
    train_total = int(graph.train_mask.sum())
    counts = {s: int(getattr(graph, f"{s}_mask").sum()) for s in ("train", "val", "test")}
    began = time.perf_counter()
    for epoch in range(start, spec.options.epochs):
        epoch_began = time.perf_counter()
        model.train()
        meter.phase = "forward"
        logits = runner.logits(model, dropout_masks(spec.config, graph.num_nodes, spec.options.seed, epoch))
        train = runner.masks["train"]
        loss = F.cross_entropy(logits[train], runner.labels[train], reduction="sum") / train_total
        optimizer.zero_grad(set_to_none=True)
        meter.phase = "backward"
        loss.backward()
        all_reduce_gradients(parameters, meter)
        optimizer.step()
        train_seconds = time.perf_counter() - epoch_began
        model.eval()
        meter.phase = "eval"
        with torch.no_grad():
            predicted = runner.logits(model, None).argmax(-1) == runner.labels
            totals = torch.tensor([float(loss.detach())] + [float(predicted[runner.masks[s]].sum()) for s in counts],
                                  dtype=torch.float64)
        dist.all_reduce(totals)
        sent, waited = meter.take()
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, {"sent": sent, "waited": waited})
        if rank != 0:
            continue
        row = {"epoch": epoch + 1, "loss": float(totals[0]),
               **{f"{s}_acc": float(totals[i + 1]) / counts[s] if counts[s] else float("nan") for i, s in enumerate(counts)},
               "seconds": time.perf_counter() - epoch_began, "train_seconds": train_seconds}
        history.append(row)
        communication.append({"epoch": epoch + 1, "ranks": gathered})
        _save_checkpoint(checkpoint, spec.key, epoch + 1, model, optimizer, history, communication)
    memory: list[Any] = [None] * world
    dist.all_gather_object(memory, _peak_rss())
    if rank == 0:
        stage = Path(spec.stage)
        stage.mkdir(parents=True, exist_ok=True)
        save_gcn(model.eval(), stage)
        record = {"kind": spec.kind, "world_size": world, "chunks": plan.chunks, "graph": graph.name, "graph_sha256": graph.sha256(),
                  "options": spec.options.model_dump(), "config": spec.config.model_dump(), "history": history,
                  "communication": communication, "peak_rss_bytes": memory, "seconds": time.perf_counter() - began,
                  "resumed_at_epoch": start if spec.resume else None, "plan": plan.model_dump()}
        # train.json last and whole: its presence says every rank finished every epoch.
        _write_atomically(stage / "train.json", lambda tmp: tmp.write_text(json.dumps(record, indent=1) + "\n"))
    dist.barrier()
    dist.destroy_process_group()


def _save_checkpoint(checkpoint: Path, key: str, epoch: int, model: GCN, optimizer: torch.optim.Optimizer,
                     history: list[dict[str, Any]], communication: list[dict[str, Any]]) -> None:
    checkpoint.mkdir(parents=True, exist_ok=True)
    _write_atomically(checkpoint / CHECKPOINT, lambda tmp: torch.save(
        {"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp))
    # progress.json last: it is what says a checkpoint is complete.
    _write_atomically(checkpoint / PROGRESS, lambda tmp: tmp.write_text(json.dumps(
        {"key": key, "epoch": epoch, "history": history, "communication": communication}) + "\n"))


def main(argv: list[str]) -> int:
    spec = RunSpec.model_validate_json(Path(argv[0]).read_text())
    try:
        run(spec)
    except (dist.DistBackendError, dist.DistNetworkError) as exc:
        # Another rank is gone (a lost connection or a timeout): the agent names the culprit.
        print(f"rank {os.environ.get('RANK', '?')}: stopped, a peer is gone ({str(exc).splitlines()[0]})", file=sys.stderr)
        return EXIT_PEER_LOST
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
