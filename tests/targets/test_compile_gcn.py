"""A GCN compiled for its graph, split into sparse parts (aggregation: our TVM segment-sum
kernel, or index_add for ONNX Runtime) and dense parts (GEMM): every part and the chained
program match PyTorch Geometric's GCN with the same weights, here and on the emulated arm64
device; the graph is required and checked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from edgec.artifact import load_reference, open_runtime, read_manifest
from edgec.cli import app
from edgec.gcn.graph import write_graph
from edgec.gcn.synthetic import block_model
from edgec.targets.runtime import run_steps, steps_inputs

runner = CliRunner()
pytestmark = pytest.mark.compile


@pytest.fixture(scope="module")
def pyg_model(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A PyG GCN (3 layers: two aggregate first, the last transforms first) imported as our model
    directory, with the graph and PyG's own logits on it."""
    from torch_geometric.nn.models import GCN as PyGGCN

    root = tmp_path_factory.mktemp("gcn")
    graph = block_model(600, classes=5, average_degree=8, features=16, seed=2)
    write_graph(graph, root / "g.npz")
    torch.manual_seed(0)
    reference = PyGGCN(16, 32, 3, 5).eval()
    for parameter in reference.parameters():  # PyG starts biases at zero: make them count
        parameter.data += 0.1 * torch.randn_like(parameter)
    torch.save(reference.state_dict(), root / "pyg.pt")
    result = runner.invoke(app, ["gcn", "import", str(root / "pyg.pt"), "--graph", str(root / "g.npz"), "-o", str(root / "model")])
    assert result.exit_code == 0, result.output + result.stderr
    with torch.no_grad():
        logits = reference(torch.from_numpy(graph.features), torch.from_numpy(graph.edge_index)).numpy()
    return {"dir": root / "model", "graph": root / "g.npz", "logits": logits, "root": root}


def chained(artifact: Path) -> np.ndarray:
    manifest = read_manifest(artifact)
    program = manifest["program"]
    return np.asarray(run_steps(open_runtime(artifact, manifest), program, steps_inputs(program, load_reference(artifact))))


@pytest.mark.parametrize("backend", ["tvm", "onnx"])
def test_compiled_parts_chain_to_pytorch_geometric_logits(pyg_model: dict, tmp_path: Path, backend: str) -> None:
    out = tmp_path / f"gcn-{backend}"
    result = runner.invoke(app, ["compile", str(pyg_model["dir"]), "--graph", str(pyg_model["graph"]), "--backend", backend,
                                 "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    summary = json.loads(result.stdout)
    assert summary["parity"]["ok"] is True, summary["parity"]
    manifest = read_manifest(out)
    assert manifest["program"]["kind"] == "steps"
    assert [s["entry"] for s in manifest["program"]["steps"]] == ["sparse0", "dense0", "sparse1", "dense1", "dense2", "sparse2"]
    assert [layer["order"] for layer in manifest["gcn"]["layers"]] == ["aggregate-first", "aggregate-first", "transform-first"]
    got = chained(out)
    np.testing.assert_allclose(got, pyg_model["logits"], rtol=0, atol=1e-4)
    assert np.abs(pyg_model["logits"]).max() > 0.5
    if backend == "tvm":
        assert "segment_sum" in manifest["gcn"]["parts"]["sparse"]
    run = runner.invoke(app, ["run", str(out), "--json"])
    assert run.exit_code == 0, run.output + run.stderr
    record = json.loads(run.stdout)
    assert set(record["parts_ms"]) == {"sparse0", "dense0", "dense1", "sparse1", "dense2", "sparse2"}
    assert record["max_abs_diff_to_reference"] < 1e-4


@pytest.mark.arm64
def test_compiled_gcn_passes_parity_on_the_emulated_arm64_device(pyg_model: dict, tmp_path: Path) -> None:
    out = tmp_path / "gcn-arm64"
    result = runner.invoke(app, ["compile", str(pyg_model["dir"]), "--graph", str(pyg_model["graph"]), "--target", "arm64",
                                 "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    result = runner.invoke(app, ["deploy", str(out), "--device", "qemu-arm64", "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads(result.stdout)
    assert report["machine"] == "aarch64" and report["parity"]["ok"] is True
    checked = {(o["entry"], o["ok"]) for o in report["parity"]["outputs"]}
    assert ("steps", True) in checked and ("sparse0", True) in checked  # the chain too, against the whole model
    result = runner.invoke(app, ["profile", str(out), "--device", "qemu-arm64", "--runs", "2", "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    profile = json.loads(result.stdout)
    assert profile["entry"] == "steps" and set(profile["parts_ms"]) >= {"sparse0", "dense2"}


def test_import_refuses_what_is_not_a_pyg_gcn_state_dict(pyg_model: dict, tmp_path: Path) -> None:
    torch.save({"convs.0.lin.weight": torch.zeros(4, 16), "convs.0.bias": torch.zeros(4), "norms.0.weight": torch.ones(4)},
               tmp_path / "normed.pt")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # a pickled module: refused, never unpickled
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    cases = [(tmp_path / "normed.pt", "norms.0.weight is not part of a plain GCN"), (tmp_path / "module.pt", "not a readable state dict"),
             (tmp_path / "junk.pt", "not a readable state dict"), (tmp_path / "missing.pt", "no such file")]
    for path, message in cases:
        result = runner.invoke(app, ["gcn", "import", str(path), "-o", str(tmp_path / "out")])
        assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.stderr, (path, result.stderr)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_a_gcn_needs_its_graph_and_a_graph_needs_a_gcn(pyg_model: dict, tmp_path: Path) -> None:
    cases = [
        ([str(pyg_model["dir"])], "a GCN is compiled for the graph it runs on: add --graph"),
        ([str(pyg_model["dir"]), "--graph", str(pyg_model["root"] / "missing.npz")], "no such graph file"),
        (["zoo:tiny-lm", "--graph", str(pyg_model["graph"])], "a graph is what a GCN is compiled for"),
    ]
    wrong = tmp_path / "wide.npz"
    write_graph(block_model(100, classes=5, average_degree=4, features=8, seed=1), wrong)
    cases.append(([str(pyg_model["dir"]), "--graph", str(wrong)], "8 features per node, the model reads 16"))
    for args, message in cases:
        result = runner.invoke(app, ["compile", *args, "-o", str(tmp_path / "out")])
        assert result.exit_code == 2, (args, result.output + result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
    assert not (tmp_path / "out").exists()


def test_sparse_parts_on_the_cpu_and_dense_parts_on_the_gpu_are_built_apart(pyg_model: dict, tmp_path: Path) -> None:
    """`--target sparse=cpu,dense=cuda`: each part compiled for its own target (the dense GEMMs
    as CUDA kernels), each entry placed on its device. This machine has no GPU, so the chain
    is run (and its parity checked) only where one is; here it is refused at run time, and
    the same artifact with both parts on the CPU runs and matches PyG."""
    out = tmp_path / "mixed"
    result = runner.invoke(app, ["compile", str(pyg_model["dir"]), "--graph", str(pyg_model["graph"]), "--target", "sparse=cpu,dense=cuda",
                                 "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    assert json.loads(result.stdout)["parity"]["reason"].startswith("built for its dense parts for cuda")
    manifest = read_manifest(out)
    assert manifest["target"]["name"] == "cpu" and {p: t["name"] for p, t in manifest["part_targets"].items()} == {"sparse": "cpu", "dense": "cuda"}
    placed = {name: (info["target"], info["device"]) for name, info in manifest["backend_record"]["entries"].items()}
    assert placed == {f"{kind}{layer}": ("cuda", "cuda") if kind == "dense" else ("cpu", "cpu") for kind in ("sparse", "dense") for layer in range(3)}
    for name, info in manifest["backend_record"]["entries"].items():
        library = (out / "model" / info["library"]).read_bytes()
        assert (b"__global__" in library) == name.startswith("dense"), name  # CUDA kernels in the dense parts only
    assert "cuda/tvm: GEMM" == manifest["gcn"]["parts"]["dense"]
    run = runner.invoke(app, ["run", str(out)])
    assert run.exit_code == 3 and "its dense parts are built for cuda and this machine lacks a CUDA GPU" in run.stderr, run.stderr

    same = tmp_path / "both-on-cpu"
    result = runner.invoke(app, ["compile", str(pyg_model["dir"]), "--graph", str(pyg_model["graph"]), "--target", "sparse=cpu,dense=cpu",
                                 "-o", str(same), "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    assert json.loads(result.stdout)["parity"]["ok"] is True
    np.testing.assert_allclose(chained(same), pyg_model["logits"], rtol=0, atol=1e-4)


def test_a_target_per_part_is_refused_where_it_cannot_work(pyg_model: dict, tmp_path: Path) -> None:
    model, graph = str(pyg_model["dir"]), str(pyg_model["graph"])
    cases = [
        ([model, "--graph", graph, "--target", "sparse=cpu"], 2, "a gcn model's parts are sparse, dense; give a target for each"),
        ([model, "--graph", graph, "--target", "sparse=cpu,dense=cuda,edges=cpu"], 2, "give a target for each"),
        ([model, "--graph", graph, "--target", "sparse=,dense=cuda"], 2, "give PART=TARGET pairs"),
        ([model, "--graph", graph, "--target", "sparse=cpu,sparse=cuda"], 2, "part sparse is given twice"),
        ([model, "--graph", graph, "--target", "sparse=cpu,dense=cdua"], 2, "unknown target 'cdua'; did you mean 'cuda'?"),
        ([model, "--graph", graph, "--target", "sparse=cpu,dense=arm64"], 3, "give one CPU target (arm64, cpu given)"),
        ([model, "--graph", graph, "--target", "sparse=cuda,dense=cuda"], 3, "give one CPU target (none given)"),
        ([model, "--graph", graph, "--target", "sparse=arm64,dense=cuda"], 3, "the CPU part cannot be arm64"),
        ([model, "--graph", graph, "--target", "sparse=cpu,dense=cuda", "--backend", "onnx"], 3, "built with --backend tvm"),
        (["zoo:tiny-lm", "--target", "sparse=cpu,dense=cuda"], 2, "zoo:tiny-lm is a causal-lm model, not built in parts"),
    ]
    for args, code, message in cases:
        result = runner.invoke(app, ["compile", *args, "-o", str(tmp_path / "out")])
        assert result.exit_code == code, (args, result.output + result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
    assert not (tmp_path / "out").exists()
