"""Measured kernel choice for the TVM CPU build: the `schedule` pass's work (Edge-LLM's
hardware scheduling of the irregular, per-layer compressed layers).

For each distinct matmul workload of an entry (a kernel's computation and shapes: dense,
or a packed-weight linear at its bits and group), candidate schedules -- register tile
shape, and for packed weights whether the decode fills a per-tile panel or is inlined
-- are compiled and timed at the entry's row count (decode: 1 row; prefill:
`prefill_rows`). The fastest is used, and every measurement goes into a per-target (and
per-device) database on disk that later compiles reuse without measuring again.

Only the real target measures: a host build is timed on the host, or on the TVM RPC
device `schedule.device` names; a cross build is timed only on such a device (each
candidate cross-compiled, uploaded and run by `time_evaluator` there). The emulated
arm64 device is refused (its timings are not ARM performance); without a device a cross
build keeps the rule templates, which the record says.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import statistics
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
import tvm
from tvm import te, tirx
from tvm.ir import IRModule
from tvm.sym import Analyzer
from tvm.target import Target

from edgec.cache import cache_root, locked
from edgec.progress import advance
from edgec.targets.tvm_schedule import CpuScheduleConfig, _is_scheduled, schedule_prim_func, workload_key

DATABASE_VERSION = 2  # 2: packed workloads try the inlined decode within the first trials


@dataclasses.dataclass(frozen=True)
class Candidate:
    tile_rows: int
    tile_vectors: int
    panel: bool

    def config(self, base: CpuScheduleConfig) -> CpuScheduleConfig:
        return dataclasses.replace(base, tile_rows=self.tile_rows, tile_vectors=self.tile_vectors, panel=self.panel)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def candidates(base: CpuScheduleConfig, packed: bool) -> list[Candidate]:
    """The template first, then the other tile shapes; for packed weights each shape with
    the decode in a per-tile panel and inlined in turn, so a few trials try both (with
    one row, a decode step's, nothing reuses the panel)."""
    shapes = [(base.tile_rows, base.tile_vectors), (4, 2), (8, 1), (4, 4), (8, 2), (2, 4), (4, 1)]
    found: list[Candidate] = []
    for rows, vectors in shapes:
        for panel in (True, False) if packed else (True,):
            candidate = Candidate(rows, vectors, panel)
            if candidate not in found:
                found.append(candidate)
    return found


def _buffers(func: tirx.PrimFunc) -> list[Any]:
    """The tensor parameters (TVM 0.27: a parameter is its buffer; scalars have no shape)."""
    return [p for p in func.params if getattr(p, "shape", None) is not None and len(p.shape) > 0]


def _is_layer_workload(func: tirx.PrimFunc) -> bool:
    """A linear layer's kernel: a static 2-D weight; any other parameter is a tensor
    whose symbolic dims are the rows (batch x tokens) or one of those integer variables.
    (Attention's matmuls change with the sequence length; they keep their template.)"""
    buffers = _buffers(func)
    scalars = [p for p in func.params if getattr(p, "shape", None) is None]
    static = [b for b in buffers if len(b.shape) == 2 and all(isinstance(d, tirx.IntImm) for d in b.shape)]
    dims = _dim_variables(buffers)
    return bool(static) and all(any(p.same_as(v) for v in dims) for p in scalars)


def _dim_variables(buffers: list[Any]) -> list[tirx.Var]:
    """The symbolic variables of the buffers' shapes, first seen first."""
    found: list[tirx.Var] = []
    for buffer in buffers:
        for dim in buffer.shape:
            found += [v for v in tirx.analysis.undefined_vars(dim) if not any(v.same_as(u) for u in found)]
    return found


def _is_packed(func: tirx.PrimFunc) -> bool:
    return any(str(buffer.dtype) == "uint8" for buffer in _buffers(func))


def _describe(func: tirx.PrimFunc) -> str:
    """Buffer shapes and dtypes, e.g. 'float32[?, ?, 576] uint8[288, 1536] ...'."""
    parts = []
    for buffer in _buffers(func):
        dims = ", ".join(str(int(d)) if isinstance(d, tirx.IntImm) else "?" for d in buffer.shape)
        parts.append(f"{buffer.dtype}[{dims}]")
    return " ".join(parts)


def _arguments(func: tirx.PrimFunc, rows: int, device: Any) -> list[Any]:
    """A value for every parameter: random tensors, and integers for the symbolic dims.
    The first input's last variable is the row count, every other variable is 1 (batch),
    so a flattened [batch * tokens, K] input has `rows` rows too."""
    buffers = _buffers(func)
    first = _dim_variables(buffers[:1])
    values = {v: (rows if first and v.same_as(first[-1]) else 1) for v in _dim_variables(buffers)}
    analyzer = Analyzer()
    for variable, value in values.items():
        analyzer.bind(variable, value)
    generator = np.random.default_rng(0)
    arguments: list[Any] = []
    for param in func.params:
        if getattr(param, "shape", None) is None:
            arguments.append(next((value for v, value in values.items() if v.same_as(param)), 1))
            continue
        shape = [int(analyzer.simplify(dim)) for dim in param.shape]
        dtype = str(param.dtype)
        if dtype.startswith("float"):
            data = generator.standard_normal(shape).astype(dtype)
        else:
            data = generator.integers(0, 8, size=shape).astype(dtype)
        arguments.append(tvm.runtime.tensor(data, device))
    return arguments


class Runner:
    """Times compiled kernels on this host."""

    where = "this host"
    # Devices of one kind share measurements: the host, or an RPC key (one board model).
    database_key = "host"

    def device(self) -> Any:
        return tvm.cpu()

    def load(self, library: Any) -> Any:
        return library.mod

    def close(self) -> None:
        """Release what the runner holds (nothing on this host)."""


class RemoteRunner(Runner):
    """Times compiled kernels on a TVM RPC server: each candidate is exported (with the
    target's cross compiler), uploaded and loaded there."""

    def __init__(self, session: Any, uri: str, key: str, cross_compiler: str | None) -> None:
        self.session = session
        self.where = uri
        self.database_key = f"rpc:{key}" if key else f"rpc:{uri}"
        self.cross_compiler = cross_compiler
        self.uploads = 0

    def device(self) -> Any:
        return self.session.cpu()

    def load(self, library: Any) -> Any:
        from tvm.support import cc

        self.uploads += 1
        name = f"edgec-tune-{os.getpid()}-{self.uploads}.so"
        with tempfile.TemporaryDirectory() as workdir:
            path = os.path.join(workdir, name)
            if self.cross_compiler is not None:
                library.export_library(path, fcompile=cc.cross_compiler(self.cross_compiler))
            else:
                library.export_library(path)
            self.session.upload(path, target=name)
        return self.session.load_module(name)

    def close(self) -> None:
        """End the RPC session: the last reference to it goes (TVM's sessions have no close)."""
        self.session = None


def measure_us(func: tirx.PrimFunc, config: CpuScheduleConfig, target: Target, rows: int, runner: Runner | None = None) -> tuple[float, str]:
    """Median microseconds of one call of `func` scheduled with `config` on the runner's
    device, and the rule applied."""
    runner = runner or Runner()
    scheduled, rule = schedule_prim_func(func, config)
    library = tvm.compile(IRModule({"main": scheduled.with_attr("global_symbol", "main")}), target)
    device = runner.device()
    arguments = _arguments(func, rows, device)
    timer = runner.load(library).time_evaluator("main", device, number=3, repeat=5, min_repeat_ms=10)
    return statistics.median(timer(*arguments).results) * 1e6, rule


class TuningDatabase:
    """Measurements per (workload, rows) for one target on one kind of device, in the cache as JSON."""

    def __init__(self, target: Target, device_key: str = "host") -> None:
        text = str(target) + tvm.__version__ + str(DATABASE_VERSION) + ("" if device_key == "host" else device_key)
        self.key = hashlib.sha256(text.encode()).hexdigest()[:16]
        self.path = cache_root() / "tuning" / f"{self.key}.json"
        self.target = str(target)
        self.device = device_key
        self.records: dict[str, Any] = {}
        if self.path.is_file():
            self.records = json.loads(self.path.read_text()).get("records", {})

    def get(self, key: str) -> dict[str, Any] | None:
        return self.records.get(key)

    def put(self, key: str, record: dict[str, Any]) -> None:
        """Merge with what other compiles wrote meanwhile, then replace the file atomically."""
        with locked(self.path.parent / f".{self.key}.lock"):
            current = json.loads(self.path.read_text()).get("records", {}) if self.path.is_file() else {}
            current[key] = record
            self.records = current
            handle, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.key}.tmp-")
            with os.fdopen(handle, "w") as out:
                json.dump({"target": self.target, "device": self.device, "version": DATABASE_VERSION, "records": current}, out, indent=1)
            os.replace(tmp, self.path)


def tune(
    fused: IRModule,
    target: Target,
    rows: int,
    trials: int,
    progress: Callable[[str], None],
    runner: Runner | None = None,
) -> tuple[dict[str, CpuScheduleConfig], dict[str, Any]]:
    """Choose a schedule per matmul workload of a fused, unscheduled module, timed by
    `runner` (default: this host).

    Returns the chosen configs by workload_key (for schedule_cpu_funcs) and the record
    for the manifest: per kernel its workload, the choice, and where it came from."""
    runner = runner or Runner()
    base = CpuScheduleConfig.from_target(target)
    database = TuningDatabase(target, runner.database_key)
    chosen: dict[str, CpuScheduleConfig] = {}
    kernels: list[dict[str, Any]] = []
    workloads: dict[str, tuple[str, tirx.PrimFunc]] = {}
    for gvar, func in fused.functions_items():
        if not isinstance(func, tirx.PrimFunc) or _is_scheduled(func):
            continue  # a kernel that is its own schedule (tvm_dot): nothing to choose
        key = workload_key(func)
        if key not in workloads:
            if not _is_layer_workload(func):
                continue
            _, rule = schedule_prim_func(func, base)
            if not rule.startswith("matmul"):
                continue
            workloads[key] = (gvar.name_hint, func)
        kernels.append({"function": gvar.name_hint, "workload": key})
    measured = 0
    summaries: dict[str, dict[str, Any]] = {}
    # Counted up front, so the progress is a share of all the timing this compile will do.
    to_time = {key: candidates(base, _is_packed(func))[:trials] for key, (_, func) in workloads.items()
               if trials > 0 and database.get(f"{key}@{rows}") is None}
    total = sum(len(options) for options in to_time.values())
    if total:
        progress(f"tune on {runner.where}: {total} candidate schedules over {len(to_time)} of {len(workloads)} workloads "
                 f"({len(workloads) - len(to_time)} in the tuning database)")
    for number, (key, (name, func)) in enumerate(sorted(workloads.items()), start=1):
        db_key = f"{key}@{rows}"
        record = database.get(db_key)
        source = "database"
        if record is None and trials > 0:
            source = "measured"
            results = []
            options = to_time.get(key) or candidates(base, _is_packed(func))[:trials]
            for index, candidate in enumerate(options, start=1):
                us, rule = measure_us(func, candidate.config(base), target, rows, runner)
                results.append({**candidate.to_json(), "us": round(us, 2), "rule": rule})
                measured += 1
                advance(progress, f"tune on {runner.where} ({rows} rows)", measured, total,
                        f"workload {number}/{len(workloads)} {name}: candidate {index}/{len(options)}")
            best = min(results, key=lambda r: r["us"])
            record = {"shapes": _describe(func), "rows": rows, "candidates": results, "best": best}
            database.put(db_key, record)
        if record is None:
            summaries[key] = {"shapes": _describe(func), "source": "template (schedule.trials=0)"}
            continue
        best = record["best"]
        chosen[key] = Candidate(best["tile_rows"], best["tile_vectors"], best["panel"]).config(base)
        template = record["candidates"][0]
        summaries[key] = {
            "shapes": record["shapes"],
            "source": source,
            "choice": {k: best[k] for k in ("tile_rows", "tile_vectors", "panel", "us")},
            "template_us": template["us"],
            "candidates_measured": len(record["candidates"]),
        }
    for kernel in kernels:
        kernel.update(summaries.get(kernel["workload"], {}))
    return chosen, {
        "rows": rows,
        "measured_on": runner.where,
        "database": str(database.path),
        "workloads": len(workloads),
        "measured_now": measured,
        "kernels": kernels,
    }


def choose_nm_kernels(
    program: Any, target: Target, rows: int, trials: int, runner: Runner, progress: Callable[[str], None]
) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """For each N:M compressed linear workload of an exported program, time its two
    kernels on the runner's device at `rows`: the decode kernel (the compressed codes
    expanded per column tile, then a dense matmul; best of its schedule candidates) and
    the sparse kernel (only the kept weights, input gathered). The faster is used; the
    measurements are kept in the tuning database like any other."""
    from edgec.targets.tvm_packed import NM_KERNELS, nm_kernel_args, nm_workload

    base = CpuScheduleConfig.from_target(target)
    database = TuningDatabase(target, runner.database_key)
    nodes = {nm_workload(n): n for n in program.graph.nodes if str(n.target) == "edgec.qlinear_nm.default"}
    choices: dict[str, str] = {}
    records: list[dict[str, Any]] = []
    for number, (workload, node) in enumerate(sorted(nodes.items()), start=1):
        db_key = f"nm-kernel {workload}@{rows}"
        record = database.get(db_key)
        source = "database"
        if record is None:
            source = "measured"
            timings = {}
            for kernel, make in NM_KERNELS.items():
                tensors, attrs = nm_kernel_args(node, tirx.Var("rows", "int64"))
                out = make(*tensors, *attrs)
                func = te.create_prim_func([t for t in tensors if t is not None] + [out])
                configs = candidates(base, packed=True)[:trials] if kernel == "decode" else [candidates(base, True)[0]]
                progress(f"tune on {runner.where}: N:M workload {number}/{len(nodes)} ({workload}, {rows} rows): {kernel} kernel")
                timings[kernel] = round(min(measure_us(func, c.config(base), target, rows, runner)[0] for c in configs), 2)
            record = {"workload": workload, "rows": rows, "us": timings, "kernel": min(timings, key=lambda k: timings[k])}
            database.put(db_key, record)
        choices[workload] = record["kernel"]
        records.append({**record, "source": source})
    return choices, records


def not_tuned(reason: str) -> dict[str, Any]:
    return {"tuned": False, "reason": reason}


__all__ = [
    "Candidate",
    "RemoteRunner",
    "Runner",
    "TuningDatabase",
    "candidates",
    "choose_nm_kernels",
    "measure_us",
    "not_tuned",
    "tune",
]
