"""MixGCN's ground: graph files checked field by field, the GCN against PyTorch Geometric's,
the mixture-of-parallelism plan's volumes against the all-to-all formula and against the
partition-parallel halo, the node order that balances the chunks, the WordNet graph."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from edgec.cli import app
from edgec.errors import BadInputError
from edgec.gcn.graph import Graph, read_graph, write_graph
from edgec.gcn.model import GCN, GCNConfig, config_from_state, load_gcn, normalized_edges, save_gcn
from edgec.gcn.plan import halo_sizes, mop_plan, node_order, partition_plan, read_plan, sizes, switch_elements
from edgec.gcn.synthetic import block_model

runner = CliRunner()


@pytest.fixture(scope="module")
def sbm() -> Graph:
    return block_model(2000, classes=8, average_degree=11, features=64, seed=0)


def test_gcn_equals_pytorch_geometric_with_its_weights() -> None:
    from torch_geometric.nn.models import GCN as PyGGCN

    torch.manual_seed(0)
    edges = np.random.default_rng(0).integers(0, 40, (2, 200))
    edges = np.concatenate([edges, edges[::-1]], axis=1)  # with duplicates and self loops, as users' graphs have
    x = torch.randn(40, 12)
    for layers in (1, 2, 3):
        reference = PyGGCN(12, 16, layers, 5).eval()
        model = GCN(config_from_state(reference.state_dict(), "pyg")).eval()
        model.load_state_dict(reference.state_dict())
        source, target, weight = (torch.from_numpy(a) for a in normalized_edges(edges, 40, True))
        with torch.no_grad():
            assert torch.allclose(model(x, source, target, weight), reference(x, torch.from_numpy(edges)), atol=1e-5)


def test_a_model_directory_round_trips_and_a_foreign_state_dict_is_refused(tmp_path: Path) -> None:
    model = GCN(GCNConfig(in_features=8, hidden=16, num_layers=2, num_classes=3))
    save_gcn(model, tmp_path / "gcn")
    loaded = load_gcn(tmp_path / "gcn")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(BadInputError, match="norms, jumping knowledge"):
        config_from_state({**model.state_dict(), "norms.0.weight": torch.zeros(16)}, "pyg.pt")
    with pytest.raises(BadInputError, match="not a GCN state dict"):
        config_from_state({"lin.weight": torch.zeros(3, 3)}, "other.pt")


def test_graph_files_refuse_bad_fields_naming_file_and_field(sbm: Graph, tmp_path: Path) -> None:
    path = tmp_path / "g.npz"
    write_graph(sbm, path)
    again = read_graph(path)
    assert again.sha256() == sbm.sha256() and again.num_classes == 8 and np.array_equal(again.edge_index, sbm.edge_index)
    arrays = dict(np.load(path))
    cases = {
        "edge_index column": {"edge_index": np.concatenate([arrays["edge_index"], [[5], [2000]]], axis=1)},
        "labels[3] = 9 is outside the 8 classes": {"labels": np.where(np.arange(2000) == 3, 9, arrays["labels"])},
        "labels must be 2000 integers": {"labels": arrays["labels"][:-1]},
        "train_mask must be 2000 booleans": {"train_mask": arrays["train_mask"][:10]},
        "no field test_mask": {"test_mask": None},
    }
    for message, change in cases.items():
        bad = {k: v for k, v in {**arrays, **change}.items() if v is not None}
        np.savez(tmp_path / "bad.npz", **bad)
        with pytest.raises(BadInputError, match=message.replace("[", r"\[").replace("]", r"\]")) as caught:
            read_graph(tmp_path / "bad.npz")
        assert str(tmp_path / "bad.npz") in caught.value.message


def test_switch_volume_is_the_all_to_all_formula() -> None:
    # N d (P-1)/P when P divides both; exact sums otherwise.
    assert switch_elements(sizes(2000, 2), 64) == 2000 * 64 // 2
    assert switch_elements(sizes(2000, 4), 64) == 2000 * 64 * 3 // 4
    rows, columns = sizes(1001, 3), sizes(10, 3)
    assert switch_elements(rows, 10) == sum(r * c for p, r in enumerate(rows) for q, c in enumerate(columns) if p != q)
    assert switch_elements(sizes(50, 1), 64) == 0


def test_mop_plan_switches_the_smaller_widths_and_stays_flat_in_p(sbm: Graph) -> None:
    config = GCNConfig(in_features=64, hidden=64, num_layers=2, num_classes=8)
    plans = {p: mop_plan(sbm, config, p) for p in (2, 4, 8)}
    for p, plan in plans.items():
        first, second = plan.layers
        # Layer 1 aggregates the features on columns and switches A X (no gradient: features).
        assert (first.order, first.input_layout, first.output_layout) == ("aggregate-first", "columns", "rows")
        assert [(s.width, s.backward) for s in first.switches] == [(64, False)]
        # Layer 2 transforms on rows first, so only the 8-wide logits travel (there and back).
        assert second.order == "transform-first" and [s.width for s in second.switches] == [8, 8]
        assert plan.forward_elements() == 2000 * (64 + 8 + 8) * (p - 1) // p
        assert plan.backward_elements() == 2000 * (8 + 8) * (p - 1) // p
        assert plan.update_balance == 1.0 and plan.aggregation_balance == 1.0
        halo = partition_plan(sbm, config, p)
        assert halo.layers[0].forward_elements == 64 * sum(halo.halo_sizes)
    # The pilot's figures (METHODS.md: 64,000 / 96,000 at P = 2 / 4 for d = 64 on 2,000 nodes).
    assert [plans[p].layers[0].forward_elements for p in (2, 4)] == [64_000, 96_000]
    # MoP stays below N d; the halo volume grows with P past it.
    assert max(plan.forward_elements() for plan in plans.values()) < 2000 * 80
    totals = [plan.partition.layers[0].forward_elements for plan in plans.values()]  # type: ignore[union-attr]
    assert totals == sorted(totals) and totals[-1] > 2 * totals[0] and totals[0] > plans[2].layers[0].forward_elements


def test_node_order_balances_every_worker_and_chunk(sbm: Graph) -> None:
    order, rows = node_order(sbm, 4, 3, True)
    assert sorted(order.tolist()) == list(range(2000))
    counts = [rows[p][c] for c in range(3) for p in range(4)]  # ids are chunk-major
    assert max(counts) - min(counts) <= 1 and sum(counts) == 2000
    degree = np.bincount(sbm.edge_index[1], minlength=2000)[order]
    edges = [int(block.sum()) for block in np.split(degree, np.cumsum(counts)[:-1])]
    assert max(edges) / (sum(edges) / len(edges)) < 1.05


def test_halo_sizes_count_outside_sources_once() -> None:
    edges = np.array([[0, 1, 2, 2, 3], [1, 0, 0, 1, 2]])
    graph = Graph(edges, np.zeros((4, 2), np.float32), np.zeros(4, np.int64), *(np.ones(4, bool),) * 3, 2)
    parts = np.array([0, 0, 1, 1])
    # Part 0 receives node 2 (one row, though it feeds two of its nodes); part 1 nothing.
    assert halo_sizes(graph, parts, 2) == [1, 0]


def test_plan_command_writes_json_and_refuses_a_plan_for_another_p(sbm: Graph, tmp_path: Path) -> None:
    graph, model = tmp_path / "sbm.npz", tmp_path / "gcn"
    write_graph(sbm, graph)
    save_gcn(GCN(GCNConfig(in_features=64, hidden=64, num_layers=2, num_classes=8)), model)
    result = runner.invoke(app, ["gcn", "plan", str(model), "--graph", str(graph), "--world-size", "4", "--chunks", "2",
                                 "-o", str(tmp_path / "plan.json"), "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    shown = json.loads(result.stdout)
    plan = read_plan(tmp_path / "plan.json")
    assert shown["world_size"] == plan.world_size == 4 and plan.forward_elements() == 2000 * 80 * 3 // 4
    with pytest.raises(BadInputError, match="planned for 4 workers, not 2"):
        plan.check_for(sbm, 2, "plan.json")
    result = runner.invoke(app, ["gcn", "plan", str(model), "--graph", str(graph), "--world-size", "3000"])
    assert result.exit_code == 2 and "more than the 2000 nodes" in result.stderr and "Traceback" not in result.output


def test_wordnet_graph_is_the_noun_hierarchy() -> None:
    from edgec.gcn.wordnet import wordnet_graph

    graph = wordnet_graph(dims=16)
    assert 80_000 < graph.num_nodes < 85_000 and graph.num_classes == 26 and graph.class_names[2] == "noun.animal"
    source, target = graph.edge_index
    assert np.array_equal(np.sort(source * graph.num_nodes + target), np.sort(target * graph.num_nodes + source))  # undirected
    assert not (source == target).any() and graph.features.shape == (graph.num_nodes, 16)
