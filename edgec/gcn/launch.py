"""`edgec gcn train`: checks everything before a process starts, then launches the workers
with torchrun's elastic agent (the engine torchrun itself runs) on 127.0.0.1, gloo.

A worker that dies stops the run: the agent ends every other worker (their process groups),
and the error names the rank that failed first; the exit code is 100 + that rank. The last
checkpoint (one per epoch) is kept for `--resume`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from edgec.errors import BadInputError, EdgecError, note_signal
from edgec.gcn.engine import CHECKPOINT, EXIT_PEER_LOST, PROGRESS, RunSpec
from edgec.gcn.graph import Graph, read_graph
from edgec.gcn.model import GCNConfig, save_gcn
from edgec.gcn.plan import Plan, metis_parts, mop_plan, partition_plan, read_plan, write_plan
from edgec.gcn.train import TrainOptions, train_single
from edgec.outputs import check_output, checkpoint_dir

KINDS = ("mop", "partition", "single")
RECORD = "train.json"
EXIT_WORKER_FAILED = 100  # + the rank


class WorkerFailedError(EdgecError):
    def __init__(self, culprit: str, then: str, rank: int) -> None:
        super().__init__(f"{culprit}; every worker was stopped; {then}")
        self.culprit = culprit  # "rank R (pid P) was killed by SIG..."
        self.exit_code = EXIT_WORKER_FAILED + min(rank, 99)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_key(graph: Graph, config: GCNConfig, options: TrainOptions, kind: str, world_size: int, chunks: int) -> str:
    """What a checkpoint must have been made with to be resumed (the epoch count may grow)."""
    fields = {"graph": graph.sha256(), "config": config.model_dump(), "options": options.model_dump(exclude={"epochs"}),
              "kind": kind, "world_size": world_size, "chunks": chunks}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def train(graph_path: Path, out: Path, kind: str, world_size: int, chunks: int, plan_path: Path | None, config_fields: dict[str, Any],
          options: TrainOptions, resume: bool, force: bool, progress: Any, spec_dir: Path | None = None) -> dict[str, Any]:
    """Train (the record of train.json), or with `spec_dir` only write the spec a torchrun of
    one's own runs (returns where it is and the command)."""
    if kind not in KINDS:
        raise BadInputError(f"--plan {kind}: give one of {', '.join(KINDS)}, or a plan .json from `edgec gcn plan`")
    if world_size < 1:
        raise BadInputError(f"--world-size {world_size}: give at least 1 worker")
    if kind == "single" and world_size != 1:
        raise BadInputError(f"--plan single runs one process; drop --world-size {world_size} or use mop / partition")
    graph = read_graph(graph_path)
    if world_size > graph.num_nodes:
        raise BadInputError(f"--world-size {world_size} is more than the {graph.num_nodes} nodes of {graph_path}; use fewer workers")
    config = GCNConfig(in_features=int(graph.features.shape[1]), num_classes=max(graph.num_classes, 2), graph=graph.name,
                       graph_sha256=graph.sha256(), **config_fields)
    plan: Plan | None = None
    if plan_path is not None:
        if kind != "mop":
            raise BadInputError(f"--plan {plan_path} is a MoP plan; a {kind} run makes its own")
        plan = read_plan(plan_path)
        plan.check_for(graph, world_size, str(plan_path))
        if plan.widths != config.widths() or plan.self_loops != config.self_loops:
            raise BadInputError(f"--plan {plan_path}: planned for widths {plan.widths}, this model has {config.widths()}; "
                                "make a plan for this model")
        chunks = plan.chunks
    check_output(out, force, RECORD, "gcn train")
    checkpoint = checkpoint_dir(out)
    key = run_key(graph, config, options, kind, world_size, chunks)
    if checkpoint.exists() and not resume:
        raise BadInputError(f"{checkpoint} holds an earlier run's checkpoint: add --resume to continue it, or delete it to start over")
    if resume:
        if kind == "single":
            raise BadInputError("--resume: single-process training keeps no checkpoint; run it again")
        if not (checkpoint / PROGRESS).is_file() or not (checkpoint / CHECKPOINT).is_file():
            raise BadInputError(f"--resume: no checkpoint at {checkpoint}; run without --resume to start")
        saved = json.loads((checkpoint / PROGRESS).read_text())
        if saved.get("key") != key:
            raise BadInputError(f"--resume: {checkpoint} was made with another graph, model, plan or options; give the same "
                                "ones (only --epochs may change) or delete it to start over")
        if int(saved["epoch"]) >= options.epochs:
            raise BadInputError(f"--resume: {checkpoint} is at epoch {saved['epoch']} already; give --epochs above it")
        progress(f"resume from {checkpoint}: epoch {saved['epoch']} of {options.epochs}")

    if spec_dir is not None:
        if kind == "single":
            raise BadInputError("--spec-only: --plan single runs in this process; give --plan mop or partition")
        if spec_dir.exists() and any(spec_dir.iterdir()):
            raise BadInputError(f"--spec-only {spec_dir} exists and is not empty; give a new directory")
        spec_dir.mkdir(parents=True, exist_ok=True)
        # torchrun's own run writes the output in place when it completes (rank 0, at the end).
        prepare_run(spec_dir, graph, graph_path, config, options, kind, world_size, chunks, plan, out, checkpoint, key, resume, progress)
        spec = (spec_dir / "spec.json").resolve()
        return {"spec": str(spec), "world_size": world_size,
                "one_node": f"torchrun --nproc-per-node {world_size} -m edgec.gcn.engine {spec}",
                "nodes": f"torchrun --nnodes N --nproc-per-node {world_size}/N --rdzv-backend c10d --rdzv-endpoint HOST:PORT "
                         f"-m edgec.gcn.engine {spec}"}
    stage = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        if kind == "single":
            model, history = train_single(graph, config, options, lambda e, r: progress.step(
                "train", e, options.epochs, f"loss {r['loss']:.4f}, val {r['val_acc']:.3f}, test {r['test_acc']:.3f}"))
            save_gcn(model, stage)
            (stage / RECORD).write_text(json.dumps({"kind": "single", "world_size": 1, "chunks": 1, "graph": graph.name,
                                                    "graph_sha256": graph.sha256(), "options": options.model_dump(),
                                                    "config": config.model_dump(), "history": history}, indent=1) + "\n")
        else:
            _launch(graph, graph_path, config, options, kind, world_size, chunks, plan, stage, checkpoint, key, resume, progress)
        record = json.loads((stage / RECORD).read_text())
        if force and out.exists():
            shutil.rmtree(out)
        os.replace(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    shutil.rmtree(checkpoint, ignore_errors=True)
    return record


def prepare_run(run_dir: Path, graph: Graph, graph_path: Path, config: GCNConfig, options: TrainOptions, kind: str, world_size: int,
                chunks: int, plan: Plan | None, stage: Path, checkpoint: Path, key: str, resume: bool, progress: Any) -> RunSpec:
    """The plan (and METIS parts) and the spec every worker reads, written into `run_dir`."""
    if plan is None:
        progress(f"plan: {kind}, P = {world_size}" + (f", {chunks} chunk(s)" if kind == "mop" else ""))
        plan = mop_plan(graph, config, world_size, chunks, partition=False)
    parts_path = None
    if kind == "partition":
        progress(f"METIS: {world_size} parts")
        parts = metis_parts(graph, world_size)
        parts_path = run_dir / "parts.npy"
        np.save(parts_path, parts)
        plan.partition = partition_plan(graph, config, world_size, parts)
    write_plan(plan, run_dir / "plan.json")
    threads = max(1, (os.cpu_count() or 1) // world_size)
    spec = RunSpec(graph=str(graph_path.resolve()), kind=kind, plan=str((run_dir / "plan.json").resolve()),  # type: ignore[arg-type]
                   parts=str(parts_path.resolve()) if parts_path else None, config=config, options=options,
                   stage=str(stage.resolve()), checkpoint=str(checkpoint.resolve()), key=key, resume=resume, threads=threads)
    (run_dir / "spec.json").write_text(spec.model_dump_json(indent=1) + "\n")
    return spec


def _launch(graph: Graph, graph_path: Path, config: GCNConfig, options: TrainOptions, kind: str, world_size: int, chunks: int,
            plan: Plan | None, stage: Path, checkpoint: Path, key: str, resume: bool, progress: Any) -> None:
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    with tempfile.TemporaryDirectory(prefix="edgec-gcn-") as tmp:
        run_dir = Path(tmp)
        spec = prepare_run(run_dir, graph, graph_path, config, options, kind, world_size, chunks, plan, stage, checkpoint, key, resume,
                           progress)
        threads = spec.threads
        launch = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=world_size, run_id=uuid.uuid4().hex,
                              rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{_free_port()}", rdzv_configs={"timeout": 120},
                              max_restarts=0, monitor_interval=0.2, logs_specs=DefaultLogsSpecs(log_dir=str(run_dir / "logs")),
                              local_addr="127.0.0.1")
        progress(f"launch {world_size} worker(s): torchrun agent, gloo on 127.0.0.1, {threads} thread(s) each")
        # The agent's warnings and failure tables: the error below says it in one line.
        loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict) if name.startswith("torch.distributed")]
        levels = [logger.level for logger in loggers]
        for logger in loggers:
            logger.setLevel(logging.CRITICAL)
        environment = dict(os.environ)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        watcher = _Watcher(checkpoint / PROGRESS, options.epochs, progress)
        watcher.start()
        try:
            elastic_launch(launch, sys.executable)("-m", "edgec.gcn.engine", str(run_dir / "spec.json"))
        except ChildFailedError as exc:
            failure = _failure(exc, checkpoint)
            if not (stage / RECORD).is_file():
                raise failure from None
            # Rank 0 writes the record only after every rank's last collective: the training is
            # whole, and a rank that then crashed in its own teardown (gloo's socket threads
            # can abort when a peer closes first) lost nothing.
            progress(f"warning: after the last epoch was saved, {failure.culprit} while shutting down; "
                     "the run is complete")
        except SignalException as exc:  # the agent ended the workers on Ctrl-C / SIGTERM
            note_signal(exc.sigval)
            raise KeyboardInterrupt from None
        finally:
            watcher.stop()
            os.environ.clear()
            os.environ.update(environment)
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


class _Watcher(threading.Thread):
    """Progress from the checkpoint rank 0 writes after each epoch (the workers' own stderr is
    held back with the other third-party output while the command runs)."""

    def __init__(self, path: Path, epochs: int, progress: Any) -> None:
        super().__init__(daemon=True)
        self.path, self.epochs, self.progress = path, epochs, progress
        self.done = threading.Event()
        self.shown = 0

    def run(self) -> None:
        while not self.done.wait(0.5):
            self.poll()

    def poll(self) -> None:
        try:
            history = json.loads(self.path.read_text())["history"]
        except (OSError, ValueError, KeyError):
            return
        for row in history[self.shown:]:
            self.progress.step("train", row["epoch"], self.epochs,
                               f"loss {row['loss']:.4f}, val {row['val_acc']:.3f}, test {row['test_acc']:.3f}")
        self.shown = max(self.shown, len(history))

    def stop(self) -> None:
        self.done.set()
        self.join()
        self.poll()


def _failure(exc: Any, checkpoint: Path) -> WorkerFailedError:
    """The rank that failed first: a worker that stopped because a peer was gone
    (EXIT_PEER_LOST) or was ended by the agent (SIGTERM) is not it."""
    failures = sorted(exc.failures.items(), key=lambda item: item[1].timestamp)
    culprits = [(rank, f) for rank, f in failures if f.exitcode not in (EXIT_PEER_LOST, -15)] or failures
    rank, failure = culprits[0]
    how = f"was killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exited with code {failure.exitcode}"
    saved = (json.loads((checkpoint / PROGRESS).read_text())["epoch"] if (checkpoint / PROGRESS).is_file() else None)
    then = (f"the checkpoint at {checkpoint} holds epoch {saved}: continue with --resume" if saved
            else "no epoch had finished: run it again")
    return WorkerFailedError(f"rank {rank} (pid {failure.pid}) {how}", then, rank)
