"""TVM backend: ExportedProgram -> Relax -> scheduled TIR -> shared library per entry.

Weights are function parameters, not constants baked into the library: both
entries (prefill, decode) read one params.safetensors, tensors that are equal
(tied embeddings) are stored once, and later graph passes can keep packed
low-bit weights packed. Every build goes through edgec's CPU schedule pipeline
because TVM's default pipeline leaves every loop nest unscheduled.
"""

from __future__ import annotations

import gc
import hashlib
import io
import os
import time
from collections.abc import Callable
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np

from edgec.errors import EdgecError, UnsupportedError
from edgec.targets.export import ExportedEntry
from edgec.targets.registry import ResolvedTarget

PARAMS_FILE = "params.safetensors"


def use_all_cores() -> None:
    """TVM's pool defaults to one thread per physical core it detects, which is 1 on
    some 2-vCPU VMs (measured: SmolLM2 prefill 1222 -> 657 ms with 2). ONNX Runtime
    and torch use every core; so does edgec unless TVM_NUM_THREADS says otherwise.
    Must run before the first parallel kernel creates the pool."""
    os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))


def _tvm_target(target: ResolvedTarget) -> Any:
    import tvm

    return tvm.target.Target(target.tvm_target)


def _compile(mod: Any, entry: ExportedEntry, tvm_target: Any, tuning: Any, target: ResolvedTarget, runner: Any,
             record: dict[str, Any], progress: Callable[[str], None]) -> Any:
    """GPUs get TVM's own pipeline (dlight GPU schedules); CPUs get edgec's schedules,
    applied once: the scheduled module is both reported and compiled."""
    import tvm

    from edgec.targets.tvm_schedule import finish_pipeline, fused_module, schedule_fused, schedule_report

    if tvm_target.kind.name != "llvm":
        return tvm.compile(mod, tvm_target, relax_pipeline="default")
    fused = fused_module(mod, tvm_target)
    chosen = None
    if tuning is not None:
        chosen, tuning_record = _tune(fused, entry.rows_per_call, tuning, target, tvm_target, runner, progress)
        record.setdefault("tuning", {})[entry.name] = tuning_record
    scheduled = schedule_fused(fused, tvm_target, chosen, _step_batch_vars(mod, entry))
    record.setdefault("schedules", {})[entry.name] = _count_rules(schedule_report(scheduled))
    record.setdefault("float_tensor_shapes", {})[entry.name] = float_tensor_shapes(scheduled)
    return tvm.compile(scheduled, tvm_target, relax_pipeline=finish_pipeline(tvm_target))


def _step_batch_vars(mod: Any, entry: ExportedEntry) -> frozenset[str]:
    """An entry of one row per call (a decode step): the symbolic sizes of its first input
    (the batch of input_ids [B, 1]), which are 1 in practice, so that the schedules know
    which kernels are small (tvm_schedule.touches_few_elements). Others: none."""
    if entry.rows_per_call != 1:
        return frozenset()
    from tvm import tirx

    shape = mod["main"].params[0].ty.shape
    return frozenset(dim.name for dim in getattr(shape, "values", []) if isinstance(dim, tirx.Var))


def _refused_as_unsupported(entry: ExportedEntry, stage: str, work: Callable[[], Any]) -> Any:
    """`work()`; for a graph from outside (an .onnx file) that TVM cannot import or build, a
    refusal, exit 3, naming the node TVM's importer was on and its reason (ONNX Runtime,
    which computed the reference, runs it). A torch entry's failure stays a bug (traceback)."""
    if entry.onnx_model is None:
        return work()
    import tvm

    refusal = None
    try:
        # The importer prints the failing operator's inputs on stdout (where --json goes).
        with redirect_stdout(io.StringIO()):
            return work()
    except EdgecError:
        raise
    except Exception as exc:  # noqa: BLE001 - the importer raises anything from KeyError to TVMError
        refusal = _refusal(entry, stage, exc, tvm.error.OpNotImplemented)
    # Raised out here, with the failed import's frames gone: they hold its block builder, which
    # warns when destroyed, and that must happen while third-party output is still collected.
    gc.collect()
    raise UnsupportedError(refusal)


def _refusal(entry: ExportedEntry, stage: str, exc: Exception, not_implemented: type) -> str:
    hint = "--backend onnx runs it (ONNX Runtime computed the reference)"
    if isinstance(exc, not_implemented):  # the importer's word for an operator it lacks
        return f"entry {entry.name}: TVM's ONNX importer has no lowering for {str(exc).split(':', 1)[-1].strip()}; {hint}"
    node = _node_being_imported(exc)
    where = f" at node {node.name or '(unnamed)'} ({node.op_type})" if node is not None else ""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    reason = f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:300]
    symbolic = sorted({d.dim_param or "?" for value in entry.onnx_model.graph.input
                       for d in value.type.tensor_type.shape.dim if not d.HasField("dim_value")})
    fix = (f"fixing its symbolic dimensions ({', '.join(symbolic)}) with --dim NAME=N or --input-shape lets edgec "
           "fold shape computations TVM cannot import; or " if symbolic else "")
    return f"entry {entry.name}: TVM cannot {stage} this graph{where}: {reason}; {fix}{hint}"


def _node_being_imported(exc: BaseException) -> Any | None:
    """The ONNX node TVM's importer was converting when it failed (its loop's `node`)."""
    found = None
    trace = exc.__traceback__
    while trace is not None:
        frame = trace.tb_frame
        if frame.f_code.co_name == "_construct_nodes" and "node" in frame.f_locals:
            found = frame.f_locals["node"]
        trace = trace.tb_next
    return found


def build(
    entries: list[ExportedEntry],
    target: ResolvedTarget,
    out_dir: Path,
    progress: Callable[[str], None],
    dtype: str = "float32",
    tuning: Any | None = None,
    entry_targets: dict[str, ResolvedTarget] | None = None,
) -> dict[str, Any]:
    """Compile every entry into out_dir/<entry>.so plus the shared params file.

    `entry_targets`: a target per entry (a GCN's sparse parts on the CPU, dense on the GPU);
    each entry records the device it runs on, which the runtime places it on.

    float16: the float32 graph goes through TVM's ToMixedPrecision (float16 compute,
    float32 accumulation), because TVM's torch importer types every matmul output
    float32 and so cannot import a half-precision program. The weight casts are then
    lifted like any weight transform, so params.safetensors stores float16 weights."""
    tvm_target = _tvm_target(target)
    runner = _runner(tuning, target, progress) if tuning is not None and tvm_target.kind.name == "llvm" else None
    try:
        return _build(entries, target, out_dir, progress, dtype, tuning, entry_targets, tvm_target, runner)
    finally:
        # Now, not when the garbage collector gets to it: TVMScript's parser keeps its callers'
        # frames (this one included) in a reference cycle, and a TVM RPC server serves one
        # session at a time, so the next compile found the device busy.
        if runner is not None:
            runner.close()


def _build(entries: list[ExportedEntry], target: ResolvedTarget, out_dir: Path, progress: Callable[[str], None], dtype: str,
           tuning: Any | None, entry_targets: dict[str, ResolvedTarget] | None, tvm_target: Any, runner: Any) -> dict[str, Any]:
    import tvm
    from safetensors.numpy import save_file
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    from edgec.targets.tvm_attention import attention_calls, attention_converters
    from edgec.targets.tvm_packed import convert_map
    from edgec.targets.tvm_sparse import convert_map as sparse_convert_map

    stored: dict[str, np.ndarray] = {}
    by_digest: dict[str, str] = {}
    record: dict[str, Any] = {"entries": {}, "params_file": PARAMS_FILE, "dtype": dtype}
    for entry in entries:
        start = time.perf_counter()
        nm_kernels: dict[str, str] = {}
        if runner is not None and tuning.trials > 0 and entry.program is not None:
            from edgec.targets.tvm_tuning import choose_nm_kernels

            rows = entry.rows_per_call or tuning.prefill_rows
            nm_kernels, nm_record = choose_nm_kernels(entry.program, tvm_target, rows, tuning.trials, runner, progress)
            if nm_record:
                record.setdefault("nm_kernels", {})[entry.name] = nm_record
        own = (entry_targets or {}).get(entry.name, target)
        own_tvm = tvm_target if own is target else _tvm_target(own)
        dot = _dot_isa(tuning, own_tvm, dtype, record)
        if tuning is not None and tuning.activations == "int8" and dot is None:
            progress(f"tvm: {entry.name}: {record['activations']['why']}")
        progress(f"tvm: import {entry.name}")
        if entry.onnx_model is not None:
            from tvm.relax.frontend.onnx import from_onnx

            mod = _refused_as_unsupported(
                entry, "import", lambda: from_onnx(entry.onnx_model, keep_params_in_input=True, sanitize_input_names=False)
            )
        else:
            try:
                mod = from_exported_program(entry.program, keep_params_as_input=True,
                                            custom_convert_map={**convert_map(nm_kernels, dot, not entry.shares_weights),
                                                                **sparse_convert_map(), **attention_converters()})
            except AssertionError as exc:  # the torch importer's word for an operator it lacks
                if "Unsupported function type" not in str(exc):
                    raise
                ops = str(exc).split("[", 1)[-1].rstrip("]") if "[" in str(exc) else str(exc)
                raise UnsupportedError(f"entry {entry.name}: TVM's PyTorch importer has no lowering for {ops}; try --backend onnx") from None
        mod, params = relax.frontend.detach_params(mod)
        if attended := attention_calls(mod):
            record.setdefault("attention_kernels", {})[entry.name] = attended
        if own_tvm.kind.name == "llvm" and dtype == "float32":
            from edgec.targets.tvm_fastmath import fast_nonlinear

            mod, replaced = fast_nonlinear(mod)
            if replaced:
                record.setdefault("fast_exp", {})[entry.name] = replaced
        if dtype == "float16":
            mod = relax.transform.ToMixedPrecision(out_dtype="float32")(mod)
        num_inputs = len(entry.input_names)
        if dot is not None:
            from edgec.targets.tvm_dot import dot_calls

            linears, kernels = dot_calls(mod)
            record["activations"].setdefault("dot_linears", {})[entry.name] = linears
            record["activations"].setdefault("dot_kernels", {})[entry.name] = kernels
        # Decode steps, where the copies cost a pass over the cache on every token. Prefill
        # keeps its broadcast copies (one per layer and prompt) until measured both ways.
        if own_tvm.kind.name == "llvm" and entry.rows_per_call == 1:
            from edgec.targets.tvm_views import read_views_in_place

            mod, in_place = read_views_in_place(mod)
            if in_place:
                record.setdefault("view_matmuls", {})[entry.name] = in_place
        if own_tvm.kind.name == "llvm" and not entry.shares_weights:
            from edgec.targets.tvm_layout import panel_width, use_panel_weights

            width = panel_width(own_tvm)
            mod, panelled = use_panel_weights(mod, num_inputs, width)
            if panelled:
                record.setdefault("weight_panels", {})[entry.name] = {"width": width, "matmuls": panelled}
        if entry.shares_weights:
            # Pre-transforming would store each entry's slices of the shared weights apart.
            values, layout = list(params.get("main", [])), "as stored (shared with the other shapes' entries)"
        else:
            mod, values, layout = _transform_params_once(mod, list(params.get("main", [])), num_inputs)
        func = mod["main"]
        param_names = [str(var.name) for var in func.params[num_inputs:]]
        if len(values) != len(param_names):
            raise RuntimeError(f"{entry.name}: {len(values)} parameter values for {len(param_names)} parameters")
        # Equal tensors (tied embeddings, the same weight in both entries) are stored once.
        keys: list[str] = []
        for name, value in zip(param_names, values):
            array = value.numpy()
            digest = hashlib.sha256(array.tobytes() + str(array.dtype).encode() + str(array.shape).encode()).hexdigest()
            if digest not in by_digest:
                by_digest[digest] = f"{entry.name}/{name}"
                stored[by_digest[digest]] = np.asarray(array, order="C")
            keys.append(by_digest[digest])
        progress(f"tvm: build {entry.name} for {_describe(own_tvm)}")
        executable = _refused_as_unsupported(
            entry, "build", lambda: _compile(mod, entry, own_tvm, tuning, own, runner if own is target else None, record, progress)
        )
        library = f"{entry.name}.so"
        if own.spec.cross_compiler is not None:
            from tvm.support import cc

            executable.export_library(str(out_dir / library), fcompile=cc.cross_compiler(own.spec.cross_compiler))
        else:
            executable.export_library(str(out_dir / library))
        record["entries"][entry.name] = {
            "library": library,
            "inputs": entry.input_names,
            "outputs": entry.output_names,
            "params": keys,
            "weight_layout": layout,
            "seconds": round(time.perf_counter() - start, 2),
            **({"target": own.name, "device": "cuda" if own.spec.arch == "cuda" else "cpu"} if entry_targets else {}),
        }
    save_file(stored, str(out_dir / PARAMS_FILE))
    return record


def _dot_isa(tuning: Any, tvm_target: Any, dtype: str, record: dict[str, Any]) -> Any:
    """The integer dot product the linears use when the recipe asks for int8 activations
    (schedule.activations) and the target has one; the record says which, or why none."""
    if tuning is None or tuning.activations != "int8":
        return None
    from edgec.targets.tvm_dot import dot_isa

    isa = dot_isa(tvm_target) if dtype == "float32" else None
    why = None if isa is not None else (
        f"{dtype} build: int8 activations apply to float32 models" if dtype != "float32"
        else "the target has no integer dot product (AVX-512 VNNI or Arm dotprod): float32 activations kept")
    record.setdefault("activations", {"requested": "int8", "isa": None if isa is None else isa.name, **({"why": why} if why else {})})
    return isa


def _transform_params_once(mod: Any, values: list[Any], num_inputs: int) -> tuple[Any, list[Any], str]:
    """Run the weight-only part of the graph (transposes of linear weights) once, at
    compile time, instead of on every call. Lifting is skipped when it would widen
    the stored weights (dequantizing packed int8 into fp32): packed stays packed."""
    import tvm
    from tvm import relax

    lifted = relax.transform.LiftTransformParams()(mod)
    names = [gv.name_hint for gv in lifted.get_global_vars()]
    if "main_transform_params" not in names:
        return mod, values, "as stored"
    # With the PrimFuncs it calls: a weight transform may be a TE kernel of its own (tvm_dot's
    # tiles); not the others, which may use instructions the host target lacks.
    transform = relax.transform.DeadCodeElimination(["main_transform_params"])(
        tvm.IRModule({gv: func for gv, func in lifted.functions_items() if gv.name_hint != "main"}))
    host = tvm.target.Target({"kind": "llvm"})
    executable = tvm.compile(transform, host)
    vm = relax.VirtualMachine(executable, tvm.cpu())
    transformed = list(vm["main_transform_params"](values))
    before = sum(v.numpy().nbytes for v in values)
    after = sum(v.numpy().nbytes for v in transformed)
    if after > before * 1.01:
        return mod, values, f"as stored (pre-transforming would grow weights {before} -> {after} bytes)"
    # Keep every function but the transform itself (PrimFuncs of packed-weight ops included).
    main_only = tvm.IRModule({gv: func for gv, func in lifted.functions_items() if gv.name_hint != "main_transform_params"})
    if len(main_only["main"].params) != num_inputs + len(transformed):
        raise RuntimeError("LiftTransformParams changed the entry's inputs")
    return main_only, transformed, "pre-transformed at compile time"


def _runner(options: Any, target: ResolvedTarget, progress: Callable[[str], None]) -> Any:
    """Where the schedule pass times kernels: the schedule.device RPC server, this host
    for a host target, or nowhere (None) for a cross target without a device."""
    from edgec.targets.tvm_tuning import RemoteRunner, Runner

    if options.device is not None and options.trials > 0:
        from edgec.passes.schedule import tuning_endpoint
        from edgec.targets.device_rpc import sessions

        endpoint = tuning_endpoint(options.device, target.spec.arch, target.name)
        session = sessions(endpoint, progress, limit=1)[0].session
        return RemoteRunner(session, endpoint.uri, endpoint.key, target.spec.cross_compiler)
    return Runner() if target.runs_here else None


def _tune(
    fused: Any, rows_per_call: int | None, options: Any, target: ResolvedTarget, tvm_target: Any, runner: Any,
    progress: Callable[[str], None],
) -> tuple[Any, dict[str, Any]]:
    """The schedule pass's work for one entry of a fused module (see targets/tvm_tuning.py)."""
    from edgec.targets.tvm_tuning import not_tuned, tune

    if runner is None:
        return None, not_tuned(
            f"built for {target.spec.arch}: kernels are timed only on the real target, and the emulated device's "
            "timings are not ARM performance; templates used (set schedule.device=rpc://BOARD:PORT?key=K to tune "
            "on a real board)"
        )
    rows = rows_per_call or options.prefill_rows
    chosen, record = tune(fused, tvm_target, rows, options.trials, progress, runner)
    return chosen, {"tuned": True, **record}


def float_tensor_shapes(mod: Any) -> list[list[int]]:
    """Static shapes of the float tensors a scheduled module creates: Relax values passed
    between kernels and buffers allocated inside kernels (parameters excluded). A packed
    weight expanded to fp32 anywhere (by constant folding, or a decode kernel of its own)
    shows up here with the weight's shape."""
    import tvm
    import tvm_ffi
    from tvm import relax, s_tir, tirx

    shapes: set[tuple[int, ...]] = set()

    def _add(dtype: str, dims: Any) -> None:
        if str(dtype).startswith(("float", "bfloat")) and all(isinstance(d, tirx.IntImm) for d in dims):
            shapes.add(tuple(int(d) for d in dims))

    def _relax_var(var: Any) -> None:
        info = getattr(var, "ty", None)  # TVM 0.27: a Relax value's tensor type
        shape = getattr(info, "shape", None)
        if hasattr(info, "dtype") and shape is not None:
            _add(info.dtype, getattr(shape, "values", shape))

    def _block(block: Any) -> None:
        for buffer in block.alloc_buffers:
            _add(buffer.dtype, buffer.shape)

    # Buffer shapes as they will be allocated: a decode panel computed per column tile is
    # declared with the weight's full shape until compaction shrinks it to the tile.
    lowering = tvm.transform.Sequential(
        [
            s_tir.transform.LowerInitBlock(),
            s_tir.transform.PlanAndUpdateBufferAllocationLocation(),
            s_tir.transform.ConvertBlocksToOpaque(),
            s_tir.transform.CompactBufferAllocation(),
        ]
    )
    compacted = lowering(tvm.IRModule({gv: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}))
    kernels = {gv.name_hint: f for gv, f in compacted.functions_items()}
    for gvar, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc):
            func = kernels[gvar.name_hint]
        if isinstance(func, relax.Function):
            params = {id(p) for p in func.params}
            visit = lambda v: None if id(v) in params else _relax_var(v)  # noqa: E731
            tvm_ffi.structural_walk(func.body, ((relax.Var, visit), (relax.DataflowVar, visit)))
        elif isinstance(func, tirx.PrimFunc):
            tvm_ffi.structural_walk(func.body, ((s_tir.SBlock, _block),))
    return [list(shape) for shape in sorted(shapes)]


def _describe(target: Any) -> str:
    if target.kind.name == "cuda":
        return f"cuda {target.attrs.get('arch', '')}"
    return str(target.attrs.get("mtriple", "") or "host")


def _count_rules(report: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for rule in report.values():
        counts[rule] = counts.get(rule, 0) + 1
    return counts
