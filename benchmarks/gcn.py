"""MixGCN on this machine: what MoP and METIS partition parallelism send, measured, next to
the plan's prediction, for P = 1, 2, 4, 8 worker processes, with single-process training
and PyTorch Geometric as the peers.

    .venv/bin/python benchmarks/gcn.py [--graphs zoo:wordnet,sbm:1000000] [--world-sizes 1,2,4,8]
        [--epochs 200] [--big-epochs 2] [--json gcn.json] [--plot benchmarks/figures/gcn-volume.png]
        [--kernels-only]

In one run, for each graph (`zoo:wordnet`, or `sbm:N`: a block model of N nodes, degree 10,
made by `edgec gcn graph sbm`):
1. single-process training through edgec (`gcn train --plan single`): the reference loss
   curve and test accuracy; PyG's `GCN` trained the same way (same widths, Adam, lr, weight
   decay, epochs, its own dropout) for time per epoch and accuracy.
2. for every P and both plans, `edgec gcn train --plan mop|partition -P P` as real processes
   (torchrun's agent, gloo on loopback): bytes each rank sent per layer in the last epoch
   (counted inside the collectives) against the plan's prediction, the work balance of the
   assignment (max / mean edges x columns aggregated and rows updated per rank), peak RSS
   per rank, the final test accuracy and the largest loss difference to the single-process
   run over all epochs. Graphs with more than 200k nodes run `--big-epochs` epochs (volume
   and memory, not accuracy).
3. the exposed communication of the chunked pipeline: MoP at the largest P with 1 and 4
   chunks, seconds per epoch spent waiting for all-to-alls.
4. the aggregation A_hat H (64 columns) alone, four ways on this CPU: edgec's TVM
   segment-sum kernel (targets/tvm_sparse.py, built for the `cpu` target), torch.sparse
   CSR @ dense (what edgec's training runs), index_select + index_add (the form the
   exported ONNX graph computes) and PyG's GCNConv propagation (its scatter-add).
   Each includes its own output allocation except the TVM kernel, which writes in place
   into a tensor torch then reads through DLPack (no copy).
Wall times of P worker processes on a 2-core machine are not speed at P > 2 and are
printed only as what they are.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgec.gcn.graph import Graph, graph_path, read_graph
from edgec.gcn.model import normalized_edges
from edgec.gcn.plan import ELEMENT_BYTES, Plan

EDGEC = str(Path(sys.executable).with_name("edgec"))
BIG = 200_000


class RunFailed(Exception):
    pass


def edgec(*args: str) -> dict[str, Any]:
    began = time.perf_counter()
    done = subprocess.run([EDGEC, *args, "--json"], capture_output=True, text=True)
    if done.returncode != 0:
        raise RunFailed(f"edgec {' '.join(args)} failed ({done.returncode}): {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''}")
    result = json.loads(done.stdout)
    result["wall_s"] = time.perf_counter() - began
    return result


def resolve(spec: str, work: Path) -> Path:
    if spec.startswith("sbm:"):
        nodes = int(spec.removeprefix("sbm:"))
        path = work / f"sbm{nodes}.npz"
        edgec("gcn", "graph", "sbm", "--nodes", str(nodes), "--degree", "10", "-o", str(path))
        return path
    return graph_path(spec)


def sent_by_layer(record: dict[str, Any], phase: str) -> dict[int, list[int]]:
    """{layer: bytes per rank} in the last epoch's `phase` (activations only)."""
    ranks = record["communication"][-1]["ranks"]
    layers: dict[int, list[int]] = {}
    for index, rank in enumerate(ranks):
        for row in rank["sent"]:
            if row["phase"] == phase and row["layer"] >= 0:
                layers.setdefault(row["layer"], [0] * len(ranks))[index] += row["bytes"]
    return layers


def waited(record: dict[str, Any]) -> float:
    """Mean seconds per epoch rank 0 waited for forward and backward all-to-alls."""
    epochs = record["communication"]
    return sum(e["ranks"][0]["waited"].get("forward", 0.0) + e["ranks"][0]["waited"].get("backward", 0.0) for e in epochs) / len(epochs)


def pyg_peer(graph: Graph, epochs: int, lr: float, weight_decay: float, seed: int) -> dict[str, Any]:
    from torch_geometric.nn.models import GCN as PyGGCN

    torch.manual_seed(seed)
    model = PyGGCN(graph.features.shape[1], 64, 2, graph.num_classes, dropout=0.5)
    x, edges = torch.from_numpy(graph.features), torch.from_numpy(graph.edge_index)
    labels = torch.from_numpy(graph.labels)
    train, test = torch.from_numpy(graph.train_mask), torch.from_numpy(graph.test_mask)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    began = time.perf_counter()
    for _ in range(epochs):
        model.train()
        loss = torch.nn.functional.cross_entropy(model(x, edges)[train], labels[train])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - began
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x, edges)[test].argmax(-1) == labels[test]).float().mean())
    return {"seconds_per_epoch": seconds / epochs, "test_acc": accuracy, "epochs": epochs}


def aggregation_kernels(graph: Graph, runs: int = 5) -> dict[str, float]:
    """Median ms of A_hat H, H [N, 64], four ways (results checked equal)."""
    from torch_geometric.nn import GCNConv

    torch.manual_seed(0)
    h = torch.randn(graph.num_nodes, 64)
    source, target, weight = (torch.from_numpy(a) for a in normalized_edges(graph.edge_index, graph.num_nodes, True))
    warnings.filterwarnings("ignore", message="Sparse")  # torch's beta notices for CSR
    csr = torch.sparse_coo_tensor(torch.stack([target, source]), weight, (graph.num_nodes, graph.num_nodes)).coalesce().to_sparse_csr()
    conv = GCNConv(64, 64, cached=True, bias=False)
    conv.lin.weight.data = torch.eye(64)  # the propagation alone: identity transform
    edges = torch.from_numpy(graph.edge_index)

    def ours() -> torch.Tensor:
        return torch.zeros_like(h).index_add(0, target, h.index_select(0, source) * weight.unsqueeze(1))

    import tvm

    from edgec.targets.registry import resolve_target
    from edgec.targets.tvm_sparse import FUNCTION, build_segment_sum, csr_by_target

    kernel = build_segment_sum(64, resolve_target("cpu", "tvm").tvm_target)[FUNCTION]
    by_row = [tvm.runtime.tensor(a) for a in (*csr_by_target(source.numpy(), target.numpy(), weight.numpy(), graph.num_nodes), h.numpy(),
                                               np.zeros(64, np.float32))]
    out = tvm.runtime.tensor(np.zeros((graph.num_nodes, 64), np.float32))

    def segment_sum() -> torch.Tensor:
        kernel(*by_row, out)
        return torch.from_dlpack(out)  # the kernel's output as a torch tensor, not copied

    ways = {"edgec TVM segment-sum kernel (cpu target)": segment_sum, "torch.sparse CSR @ dense (edgec training)": lambda: csr @ h,
            "index_select + index_add (the exported form)": ours, "PyG GCNConv propagate (cached norm)": lambda: conv(h, edges)}
    want = ours()
    result = {}
    with torch.no_grad():
        for name, call in ways.items():
            got = call()
            assert torch.allclose(got, want, atol=1e-4), name
            times = []
            for _ in range(runs):
                began = time.perf_counter()
                call()
                times.append((time.perf_counter() - began) * 1e3)
            result[name] = float(np.median(times))
    return result


def plan_balance(plan: Plan, kind: str) -> dict[str, float]:
    if kind == "mop":
        return {"aggregation": plan.aggregation_balance, "update": plan.update_balance}
    assert plan.partition is not None
    return {"aggregation": plan.partition.aggregation_balance, "update": plan.partition.update_balance}


def predicted(plan: Plan, kind: str) -> dict[int, tuple[int, int]]:
    """{layer: (forward, backward) elements}."""
    if kind == "mop":
        layers = {layer.layer: (layer.forward_elements, layer.backward_elements) for layer in plan.layers}
        if plan.final_switch is not None:
            layers[len(plan.layers)] = (plan.final_switch.elements, plan.final_switch.elements)
        return layers
    assert plan.partition is not None
    return {layer.layer: (layer.forward_elements, layer.backward_elements) for layer in plan.partition.layers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--graphs", default="zoo:wordnet,sbm:1000000")
    parser.add_argument("--world-sizes", default="1,2,4,8")
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--big-epochs", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--from-json", type=Path, default=None, help="print the tables (and plot) of an earlier run's --json")
    parser.add_argument("--kernels-only", action="store_true", help="only part 4, the aggregation kernels, for each graph")
    args = parser.parse_args()
    if args.kernels_only:
        with tempfile.TemporaryDirectory() as tmp:
            for spec in args.graphs.split(","):
                times = aggregation_kernels(read_graph(resolve(spec, Path(tmp))))
                torch_csr = times["torch.sparse CSR @ dense (edgec training)"]
                print(f"{spec}: A_hat H, 64 columns: " + ", ".join(f"{k} {v:.1f} ms ({v / torch_csr:.2f}x torch.sparse)"
                                                                for k, v in times.items()), flush=True)
        return
    if args.from_json:
        report = json.loads(args.from_json.read_text())
        print(markdown(report))
        if args.plot:
            plot(report, args.plot)
        return
    world_sizes = [int(p) for p in args.world_sizes.split(",")]
    report: dict[str, Any] = {"graphs": {}, "world_sizes": world_sizes, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for spec in args.graphs.split(","):
            path = resolve(spec, work)
            graph = read_graph(path)
            runs_dir = work / path.stem
            runs_dir.mkdir()
            epochs = args.epochs if graph.num_nodes <= BIG else args.big_epochs
            print(f"\n{graph.describe()}; {epochs} epochs", flush=True)
            entry: dict[str, Any] = {"nodes": graph.num_nodes, "edges": graph.num_edges, "epochs": epochs, "runs": []}
            single = edgec("gcn", "train", str(path), "--plan", "single", "--epochs", str(epochs), "-o", str(runs_dir / "single"))
            reference = [row["loss"] for row in single["record"]["history"]]
            entry["single"] = {"test_acc": single["test_acc"], "wall_s": single["wall_s"],
                               "seconds_per_epoch": float(np.mean([r["train_seconds"] for r in single["record"]["history"]]))}
            entry["pyg"] = pyg_peer(graph, epochs, 0.01, 5e-4, 0)
            print(f"single process (edgec): test acc {single['test_acc']:.4f}, {entry['single']['seconds_per_epoch']:.3f} s per training step; "
                  f"PyG GCN: test acc {entry['pyg']['test_acc']:.4f}, "
                  f"{entry['pyg']['seconds_per_epoch']:.3f} s per training step", flush=True)
            for world_size in world_sizes:
                for kind in ("mop", "partition"):
                    out = runs_dir / f"{kind}{world_size}"
                    try:
                        result = edgec("gcn", "train", str(path), "--plan", kind, "-P", str(world_size), "--epochs", str(epochs),
                                       "-o", str(out))
                    except RunFailed as exc:  # out of memory at large P, say: recorded, the other runs go on
                        entry["runs"].append({"kind": kind, "world_size": world_size, "error": str(exc)})
                        print(f"P={world_size} {kind:9}: {exc}", flush=True)
                        continue
                    record = result["record"]
                    run_plan = Plan.model_validate(record["plan"])
                    forward, backward = sent_by_layer(record, "forward"), sent_by_layer(record, "backward")
                    want = predicted(run_plan, kind)
                    layers = [{"layer": layer, "forward_bytes": sum(forward.get(layer, [0])), "backward_bytes": sum(backward.get(layer, [0])),
                               "predicted_forward_bytes": f * ELEMENT_BYTES, "predicted_backward_bytes": b * ELEMENT_BYTES,
                               "bytes_per_rank": [x + y for x, y in zip(forward.get(layer, [0] * world_size),
                                                                       backward.get(layer, [0] * world_size))]}
                              for layer, (f, b) in sorted(want.items())]
                    losses = [row["loss"] for row in record["history"]]
                    run = {"kind": kind, "world_size": world_size, "layers": layers,
                           "measured_bytes": sum(l["forward_bytes"] + l["backward_bytes"] for l in layers),
                           "predicted_bytes": sum(l["predicted_forward_bytes"] + l["predicted_backward_bytes"] for l in layers),
                           "balance": plan_balance(run_plan, kind), "peak_rss_bytes": record["peak_rss_bytes"],
                           "test_acc": result["test_acc"], "max_loss_difference": max(abs(a - b) for a, b in zip(losses, reference)),
                           "wall_s": result["wall_s"], "waited_s_per_epoch": waited(record)}
                    entry["runs"].append(run)
                    print(f"P={world_size} {kind:9}: sent {run['measured_bytes'] / ELEMENT_BYTES:>13,.0f} elements/step "
                          f"(predicted {run['predicted_bytes'] / ELEMENT_BYTES:,.0f}), balance agg {run['balance']['aggregation']:.3f} "
                          f"upd {run['balance']['update']:.3f}, peak RSS/rank {max(run['peak_rss_bytes']) / 1e6:.0f} MB, "
                          f"test acc {run['test_acc']:.4f}, |loss - single| <= {run['max_loss_difference']:.1e}, "
                          f"wall {run['wall_s']:.0f} s", flush=True)
            largest = max(world_sizes)
            if largest > 1:
                entry["pipeline"] = []
                for chunks in (1, 4):
                    try:
                        result = edgec("gcn", "train", str(path), "--plan", "mop", "-P", str(largest), "--chunks", str(chunks),
                                       "--epochs", str(min(epochs, 20)), "-o", str(runs_dir / f"chunks{chunks}"))
                    except RunFailed as exc:
                        print(f"MoP P={largest}, {chunks} chunk(s): {exc}", flush=True)
                        continue
                    history = result["record"]["history"]
                    entry["pipeline"].append({"chunks": chunks, "world_size": largest, "waited_s_per_epoch": waited(result["record"]),
                                              "train_s_per_epoch": float(np.mean([r["train_seconds"] for r in history]))})
                    print(f"MoP P={largest}, {chunks} chunk(s): {entry['pipeline'][-1]['waited_s_per_epoch']:.3f} s/epoch waiting "
                          f"for all-to-alls of {entry['pipeline'][-1]['train_s_per_epoch']:.3f} s/epoch training", flush=True)
            entry["aggregation_ms"] = aggregation_kernels(graph)
            print("A_hat H, 64 columns: " + ", ".join(f"{k} {v:.1f} ms" for k, v in entry["aggregation_ms"].items()), flush=True)
            report["graphs"][spec] = entry
    print("\n" + markdown(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    if args.plot:
        plot(report, args.plot)


def markdown(report: dict[str, Any]) -> str:
    """The README's tables: per graph, every run; the peers; the pipeline; the kernels."""
    lines = []
    for name, entry in report["graphs"].items():
        single, pyg = entry["single"], entry["pyg"]
        lines += [f"{name} ({entry['nodes']:,} nodes, {entry['edges']:,} edges, {entry['epochs']} epochs): single process (edgec) test acc "
                  f"{single['test_acc']:.4f}, {single['seconds_per_epoch']:.3f} s per training step; PyG GCN test acc {pyg['test_acc']:.4f}, "
                  f"{pyg['seconds_per_epoch']:.3f} s per training step ({pyg['seconds_per_epoch'] / single['seconds_per_epoch']:.2f}x edgec's)", "",
                  "| P | plan | elements sent per step, measured | predicted | per layer (fwd + bwd) | balance agg / upd | peak RSS per rank (max) | test acc | max \\|loss - single\\| |",
                  "|---:|---|---:|---:|---|---|---:|---:|---:|"]
        for run in entry["runs"]:
            plan = "MoP" if run["kind"] == "mop" else "METIS partition"
            if "error" in run:
                lines.append(f"| {run['world_size']} | {plan} | failed: {run['error']} | | | | | | |")
                continue
            per_layer = ", ".join(f"{(l['forward_bytes'] + l['backward_bytes']) // ELEMENT_BYTES:,}" for l in run["layers"])
            lines.append(f"| {run['world_size']} | {plan} | {run['measured_bytes'] // ELEMENT_BYTES:,} | {run['predicted_bytes'] // ELEMENT_BYTES:,} | "
                         f"{per_layer} | {run['balance']['aggregation']:.3f} / {run['balance']['update']:.3f} | "
                         f"{max(run['peak_rss_bytes']) / 1e6:,.0f} MB | {run['test_acc']:.4f} | {run['max_loss_difference']:.1e} |")
        for run in entry.get("pipeline", []):
            lines.append(f"\nMoP P = {run['world_size']}, {run['chunks']} chunk(s): {run['waited_s_per_epoch']:.3f} s per epoch waiting for "
                         f"all-to-alls, of {run['train_s_per_epoch']:.3f} s per training step")
        kernels = entry.get("aggregation_ms", {})
        if kernels:
            fastest = min(kernels.values())
            lines.append("\nA_hat H (64 columns): " + "; ".join(f"{k} {v:.1f} ms ({v / fastest:.2f}x)" for k, v in kernels.items()))
        lines.append("")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    graphs = report["graphs"]
    pipelines = [(name, entry["pipeline"]) for name, entry in graphs.items() if entry.get("pipeline")]
    panels = len(graphs) + (1 if pipelines else 0)
    figure, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    if pipelines:
        axis = axes[0][-1]
        labels, exposed, training = [], [], []
        for name, runs in pipelines:
            for run in runs:
                labels.append(f"{name}\nP={run['world_size']}, {run['chunks']} chunk(s)")
                exposed.append(run["waited_s_per_epoch"])
                training.append(run["train_s_per_epoch"])
        positions = np.arange(len(labels))
        axis.bar(positions - 0.2, training, 0.4, label="training step", color="tab:gray")
        axis.bar(positions + 0.2, exposed, 0.4, label="waiting for all-to-alls (not overlapped)", color="tab:red")
        axis.set_xticks(positions, labels, fontsize=7)
        axis.set_ylabel("seconds per epoch (rank 0)")
        axis.set_title("MoP pipeline: exposed communication")
        axis.legend(fontsize=8, loc="upper left")
    for axis, (name, entry) in zip(axes[0], graphs.items()):
        for kind, colour in (("mop", "tab:blue"), ("partition", "tab:orange")):
            runs = [r for r in entry["runs"] if r["kind"] == kind and r["world_size"] > 1 and "error" not in r]
            ps = [r["world_size"] for r in runs]
            axis.plot(ps, [r["predicted_bytes"] / ELEMENT_BYTES for r in runs], "-", color=colour, alpha=0.5,
                      label=f"{'MoP' if kind == 'mop' else 'partition (METIS)'} predicted")
            axis.plot(ps, [r["measured_bytes"] / ELEMENT_BYTES for r in runs], "o", color=colour,
                      label=f"{'MoP' if kind == 'mop' else 'partition (METIS)'} measured")
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("workers P")
        axis.set_ylabel("elements sent per training step (fwd + bwd)")
        axis.set_title(f"{name}: {entry['nodes']:,} nodes")
        axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
