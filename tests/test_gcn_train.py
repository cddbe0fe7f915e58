"""Distributed full-graph GCN training with real processes (torchrun's agent, gloo on
loopback): MoP and METIS partition parallelism reproduce single-process training, every
byte the collectives send is counted and equals the plan's prediction, a killed rank stops
every worker and the run resumes from its checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgec.cli import app
from edgec.gcn.graph import write_graph
from edgec.gcn.model import GCNConfig
from edgec.gcn.plan import ELEMENT_BYTES, PartitionPlan, Plan
from edgec.gcn.synthetic import block_model
from tests.conftest import free_port

runner = CliRunner()
EPOCHS = 3


@pytest.fixture(scope="module")
def sbm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("graphs") / "sbm.npz"
    write_graph(block_model(2000, classes=8, average_degree=11, features=64, seed=0), path)
    return path


@pytest.fixture(scope="module")
def single(sbm: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("single") / "gcn"
    result = runner.invoke(app, ["gcn", "train", str(sbm), "--plan", "single", "--epochs", str(EPOCHS), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    return json.loads(result.stdout)["record"]


def sent(record: dict, phase: str, layer: int | None = None) -> int:
    """Bytes all ranks sent in the last epoch's `phase` (activation switches / halos only)."""
    return sum(row["bytes"] for rank in record["communication"][-1]["ranks"] for row in rank["sent"]
               if row["phase"] == phase and row["layer"] >= 0 and (layer is None or row["layer"] == layer))


@pytest.mark.parametrize(("kind", "world_size", "chunks"), [("mop", 2, 2), ("mop", 4, 1), ("partition", 2, 1), ("partition", 4, 1)])
def test_distributed_training_reproduces_single_process_and_sends_what_the_plan_predicts(
        sbm: Path, single: dict, tmp_path: Path, kind: str, world_size: int, chunks: int) -> None:
    out = tmp_path / "gcn"
    result = runner.invoke(app, ["gcn", "train", str(sbm), "--plan", kind, "-P", str(world_size), "--chunks", str(chunks),
                                 "--epochs", str(EPOCHS), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    record = json.loads(result.stdout)["record"]
    assert record["kind"] == kind and record["world_size"] == world_size and len(record["communication"]) == EPOCHS
    for ours, reference in zip(record["history"], single["history"], strict=True):
        assert ours["loss"] == pytest.approx(reference["loss"], abs=1e-5), (ours, reference)
        assert ours["test_acc"] == pytest.approx(reference["test_acc"], abs=1e-6)  # one node is 2e-3
    assert record["history"][-1]["loss"] < record["history"][0]["loss"] - 0.5  # it trained

    plan = Plan.model_validate(record["plan"])
    if kind == "mop":
        for layer in plan.layers:
            assert sent(record, "forward", layer.layer) == layer.forward_elements * ELEMENT_BYTES
            assert sent(record, "backward", layer.layer) == layer.backward_elements * ELEMENT_BYTES
        assert sent(record, "forward") == plan.forward_elements() * ELEMENT_BYTES > 0
        assert sent(record, "backward") == plan.backward_elements() * ELEMENT_BYTES
        # Evaluation runs the same switches forward.
        assert sent(record, "eval") == plan.forward_elements() * ELEMENT_BYTES
        per_rank = [sum(r["bytes"] for r in rank["sent"] if r["phase"] == "forward" and r["layer"] >= 0)
                    for rank in record["communication"][-1]["ranks"]]
        assert max(per_rank) - min(per_rank) <= 64 * ELEMENT_BYTES * 2  # balanced blocks: ranks send nearly the same
    else:
        halo: PartitionPlan = plan.partition  # type: ignore[assignment]
        assert halo is not None and halo.method == "metis"
        for layer in halo.layers:
            assert sent(record, "forward", layer.layer) == layer.forward_elements * ELEMENT_BYTES
            assert sent(record, "backward", layer.layer) == layer.backward_elements * ELEMENT_BYTES
        assert sent(record, "forward") > 0
    config = GCNConfig.model_validate_json((out / "config.json").read_text())
    assert config.graph_sha256 == record["graph_sha256"] and (out / "model.safetensors").is_file()


def test_mop_sends_less_than_partition_parallelism_on_the_block_model(sbm: Path, tmp_path: Path) -> None:
    totals = {}
    for kind in ("mop", "partition"):
        result = runner.invoke(app, ["gcn", "train", str(sbm), "--plan", kind, "-P", "4", "--epochs", "1", "-o", str(tmp_path / kind),
                                     "--json"])
        assert result.exit_code == 0, result.output + result.stderr
        totals[kind] = json.loads(result.stdout)["activation_bytes_per_epoch"]
    # Measured, not predicted: 144,000 vs 202,000 elements per step at P = 4.
    assert totals["mop"] * 1.3 < totals["partition"], totals


def _workers(root: int) -> dict[int, int]:
    """{rank: pid} of the engine processes below `root`."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
            environment = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"edgec.gcn.engine" in command and f"EDGEC_TEST_RUN={root}".encode() in environment:
            rank = next(v for v in environment if v.startswith(b"RANK="))
            found[int(rank[5:])] = int(entry.name)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_killed_rank_stops_every_worker_and_the_run_resumes(tmp_path: Path) -> None:
    graph = tmp_path / "sbm20k.npz"
    write_graph(block_model(20_000, classes=8, average_degree=11, features=64, seed=1), graph)
    out = tmp_path / "gcn"
    command = [sys.executable, "-m", "edgec.cli", "gcn", "train", str(graph), "--plan", "mop", "-P", "2", "--epochs", "100000",
               "-o", str(out)]
    marker = str(os.getpid())
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "EDGEC_TEST_RUN": marker})
    progress = tmp_path / "gcn.checkpoint" / "progress.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if progress.is_file() and json.loads(progress.read_text() or "{}").get("epoch", 0) >= 3:
            break
        time.sleep(0.2)
    workers = _workers(int(marker))
    assert sorted(workers) == [0, 1], (workers, process.poll())
    os.kill(workers[1], signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = process.communicate(timeout=120)
    stopped = time.monotonic() - killed
    assert process.returncode == 101, stderr  # 100 + the rank
    assert f"rank 1 (pid {workers[1]}) was killed by SIGKILL" in stderr and "--resume" in stderr and "Traceback" not in stderr
    assert stopped < 60, stopped
    time.sleep(0.5)
    assert not any(_alive(pid) for pid in workers.values()) and not _workers(int(marker))
    assert not out.exists()  # nothing half-written

    saved = json.loads(progress.read_text())["epoch"]
    result = runner.invoke(app, ["gcn", "train", str(graph), "--plan", "mop", "-P", "2", "--epochs", str(saved + 2), "-o", str(out),
                                 "--resume", "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    resumed = json.loads(result.stdout)["record"]
    assert resumed["resumed_at_epoch"] == saved and [r["epoch"] for r in resumed["history"]] == list(range(1, saved + 3))
    assert not progress.parent.exists()
    # The resumed run is the uninterrupted one.
    result = runner.invoke(app, ["gcn", "train", str(graph), "--plan", "mop", "-P", "2", "--epochs", str(saved + 2),
                                 "-o", str(tmp_path / "straight"), "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    straight = json.loads(result.stdout)["record"]
    assert [r["loss"] for r in resumed["history"]] == pytest.approx([r["loss"] for r in straight["history"]], abs=1e-6)


def _abort_rank_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str) -> None:
    """Workers (fresh interpreters) read this sitecustomize; the test process has started already."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import atexit, os\n"
        "if os.environ.get('RANK') == '1':\n"
        + ("    atexit.register(os.abort)\n" if when == "at exit" else
           "    import torch.distributed as dist\n"
           "    dist.all_gather_object = lambda *a, **k: os.abort()\n"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]))


def test_a_rank_that_crashes_in_its_teardown_after_the_last_epoch_loses_nothing(
        sbm: Path, single: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _abort_rank_one(tmp_path, monkeypatch, "at exit")
    out = tmp_path / "gcn"
    result = runner.invoke(app, ["gcn", "train", str(sbm), "--plan", "mop", "-P", "2", "--epochs", str(EPOCHS), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    assert "rank 1" in result.stderr and "SIGABRT" in result.stderr and "the run is complete" in result.stderr
    record = json.loads(result.stdout)["record"]
    assert [r["loss"] for r in record["history"]] == pytest.approx([r["loss"] for r in single["history"]], abs=1e-5)
    assert (out / "model.safetensors").is_file() and not (tmp_path / "gcn.checkpoint").exists()


def test_a_rank_that_crashes_before_the_record_is_written_fails_the_run(
        sbm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _abort_rank_one(tmp_path, monkeypatch, "in the last epoch")  # its first all_gather_object ends epoch 1
    out = tmp_path / "gcn"
    result = runner.invoke(app, ["gcn", "train", str(sbm), "--plan", "mop", "-P", "2", "--epochs", str(EPOCHS), "-o", str(out)])
    assert result.exit_code == 101, result.output + result.stderr
    assert "rank 1" in result.stderr and "SIGABRT" in result.stderr and "the run is complete" not in result.stderr
    assert not out.exists()


def test_bad_runs_are_refused_before_any_process_starts(sbm: Path, tmp_path: Path) -> None:
    plan = tmp_path / "plan4.json"
    model = tmp_path / "model"
    result = runner.invoke(app, ["gcn", "train", str(sbm), "--plan", "single", "--epochs", "1", "-o", str(model)])
    assert result.exit_code == 0, result.output + result.stderr
    result = runner.invoke(app, ["gcn", "plan", str(model), "--graph", str(sbm), "-P", "4", "-o", str(plan)])
    assert result.exit_code == 0, result.output + result.stderr
    cases = [
        (["--plan", "mop", "-P", "3000"], "more than the 2000 nodes"),
        (["--plan", str(plan), "-P", "2"], "planned for 4 workers, not 2"),
        (["--plan", str(plan), "-P", "4", "--hidden", "32"], "planned for widths [64, 64, 8]"),
        (["--plan", "single", "-P", "2"], "single runs one process"),
        (["--plan", "ring", "-P", "2"], "give one of mop, partition, single"),
        (["--plan", "mop", "-P", "2", "--resume"], "no checkpoint at"),
    ]
    for extra, message in cases:
        result = runner.invoke(app, ["gcn", "train", str(sbm), "-o", str(tmp_path / "out"), "--epochs", "1", *extra])
        assert result.exit_code == 2, (extra, result.output + result.stderr)
        assert message in result.stderr and "Traceback" not in result.output + result.stderr, (extra, result.stderr)
    other = tmp_path / "other.npz"
    write_graph(block_model(500, classes=4, average_degree=6, features=64, seed=3), other)
    result = runner.invoke(app, ["gcn", "train", str(other), "--plan", str(plan), "-P", "4", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "planned for the graph sbm" in result.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_stock_torchrun_runs_the_spec_that_spec_only_writes(sbm: Path, single: dict, tmp_path: Path) -> None:
    out, spec_dir = tmp_path / "gcn", tmp_path / "spec"
    result = runner.invoke(app, ["gcn", "train", str(sbm), "--plan", "mop", "-P", "2", "--chunks", "2", "--epochs", str(EPOCHS),
                                 "-o", str(out), "--spec-only", str(spec_dir), "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    told = json.loads(result.stdout)
    assert told["one_node"].startswith("torchrun --nproc-per-node 2 -m edgec.gcn.engine") and not out.exists()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), "-m", "edgec.gcn.engine", told["spec"]]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "train.json").read_text())
    assert [r["loss"] for r in record["history"]] == pytest.approx([r["loss"] for r in single["history"]], abs=1e-5)
    assert sent(record, "forward") == Plan.model_validate(record["plan"]).forward_elements() * ELEMENT_BYTES
    # torchrun with another world size than the plan's: refused by the workers, naming the fix.
    command[command.index("--nproc-per-node") + 1] = "1"
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "planned for 2 workers, torchrun started 1" in done.stderr


def test_an_output_that_is_not_ours_is_never_replaced(sbm: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for extra in ([], ["--force"]):
        result = runner.invoke(app, ["gcn", "train", str(sbm), "--plan", "single", "--epochs", "1", "-o", str(out), *extra])
        assert result.exit_code == 2 and ("exists and is not empty" in result.stderr if not extra
                                          else "not an edgec gcn train output" in result.stderr), result.stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
