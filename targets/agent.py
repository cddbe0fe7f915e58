"""edgec device agent: runs ON the device, next to an uploaded artifact.

Standard library + numpy + the TVM runtime or ONNX Runtime only: it must not
import edgec, torch or the TVM compiler, because devices have none of them.
edgec uploads this file and runtime.py (the runtime, parity rule and programs it
shares with the host) with the artifact and calls it:

    python3 agent.py check  ARTIFACT_DIR [KEY] # machine, runtime versions, sha256 of every file;
                                              # with KEY (ed25519 public key, hex), the signature
    python3 agent.py parity ARTIFACT_DIR      # the parity rule (runtime.py) on the reference inputs and program
    python3 agent.py profile ARTIFACT_DIR RUNS WARMUP PROMPT_LEN NEW_TOKENS
                                              # latency percentiles, load time, peak RSS, per-op time, tokens/s
    python3 agent.py nll    ARTIFACT_DIR WINDOWS_JSON
                                              # summed NLL of each token window (perplexity on the device)
    python3 agent.py prune  UPLOADS_DIR CAP_BYTES [KEEP_NAME]
                                              # remove the oldest uploads until they fit in CAP_BYTES

Each command prints one JSON object on stdout.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

try:
    from edgec.targets import runtime as shared
    from edgec.targets.signature import signature_problem
except ImportError:  # on a device: runtime.py and signature.py are uploaded beside this file
    import runtime as shared  # type: ignore[no-redef]
    from signature import signature_problem  # type: ignore[no-redef]


def _onnx_model_dir(root: Path) -> Path:
    """Under qemu-user (-L ROOTFS) ORT resolves external data to the host path and then
    rejects it as outside the model's directory; the emulator passes the host-side root
    so models are opened by that same path. On real devices the variable is unset."""
    model_dir = root / "model"
    host_root = os.environ.get("EDGEC_QEMU_HOST_ROOT")
    return Path(host_root + str(model_dir.resolve())) if host_root else model_dir


def _versions() -> dict[str, str]:
    """Runtime versions from the installed packages' metadata: importing TVM to ask it takes
    half a minute on an emulated core (and seconds on a small board) before anything runs."""
    from importlib import metadata

    versions = {"python": platform.python_version(), "numpy": np.__version__}
    for key, package in (("tvm", "apache-tvm"), ("onnxruntime", "onnxruntime")):
        try:
            versions[key] = metadata.version(package)
        except metadata.PackageNotFoundError:  # built from source: no metadata, ask the module
            try:
                versions[key] = str(__import__(key).__version__)
            except ImportError:
                versions[key] = "missing"
    return versions


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """ISA features as Linux names them: 'flags' on x86, 'Features' on ARM."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def _cuda_capability() -> str | None:
    """'sm_XY' of GPU 0, or None without a usable GPU."""
    try:
        tvm = shared.tvm_with_cuda()
        device = tvm.cuda(0)
        if not device.exist:
            return None
        return "sm_" + str(device.compute_version).replace(".", "")
    except Exception:  # no CUDA runtime in this TVM build, or no driver
        return None


def missing_features(target: dict[str, Any], gpu: str | None = None) -> list[str]:
    """Features the artifact's code needs that this machine lacks (names as recorded);
    `gpu` is this machine's 'sm_XY' when the caller has already asked for it."""
    required = list(target.get("isa_features", []))
    if target.get("arch") == "cuda":
        have = gpu or _cuda_capability()
        if have is None:
            return ["a CUDA GPU (none found, or no driver)"]
        # The CUDA source is generated for the target's arch and compiled here at load:
        # newer GPUs run it, older ones may lack instructions it uses.
        need = required[0] if required else "sm_50"
        return [f"{need} (GPU is {have})"] if int(have[3:]) < int(need[3:]) else []
    flags = cpu_flags()
    return [name for name in required if name not in flags]


def check(root: Path, trusted: str | None = None) -> dict[str, Any]:
    """Before anything of the artifact runs: with `trusted`, its signature first (the
    hashes are only as good as the manifest that lists them)."""
    if trusted is not None:
        problem = signature_problem(root, trusted)
        if problem is not None:
            return {"signature_ok": False, "signature_problem": problem}
    manifest = json.loads((root / "manifest.json").read_text())
    mismatched = []
    for name, expected in manifest["files"].items():
        path = root / name
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"
        if digest != expected:
            mismatched.append(name)
    targets = [manifest["target"], *manifest.get("part_targets", {}).values()]  # parts placed apart: a CPU and a GPU
    gpu = _cuda_capability() if any(t.get("arch") == "cuda" for t in targets) else None
    missing = sorted({name for target in targets for name in missing_features(target, gpu)})
    return {
        "machine": "cuda" if gpu and manifest["target"].get("arch") == "cuda" else platform.machine(),
        "host_machine": platform.machine(),
        "versions": _versions(),
        "hashes_ok": not mismatched,
        "mismatched": mismatched,
        "missing_features": missing,
        "signature_ok": True if trusted is not None else None,
    }


def _runtime(root: Path, manifest: dict[str, Any]) -> shared.Runtime:
    on_gpu = manifest["target"].get("arch") == "cuda"
    model_dir = _onnx_model_dir(root) if manifest["backend"] == "onnx" else root / "model"
    return shared.Runtime(model_dir, manifest["backend"], manifest["backend_record"], on_gpu=on_gpu)


def parity(root: Path) -> dict[str, Any]:
    """The shared parity rule (shared.check_parity), on this device."""
    manifest = json.loads((root / "manifest.json").read_text())
    reference = shared.read_safetensors(root / manifest["reference"]["file"])
    tolerance = manifest["reference"]["tolerance"]
    return shared.check_parity(_runtime(root, manifest), manifest["program"], reference, float(tolerance["rtol"]),
                               float(tolerance.get("atol", 0.0)))


def nll(root: Path, windows_json: str) -> dict[str, Any]:
    """Summed negative log-likelihood of tokens[1:] for each window, the rule of
    edgec.evaluate.window_nll; the logits (windows x vocab floats) never leave the device."""
    manifest = json.loads((root / "manifest.json").read_text())
    runtime = _runtime(root, manifest)
    generation = shared.Generation(manifest["program"])
    sums = []
    for number, tokens in enumerate(json.loads(windows_json), start=1):
        outputs = runtime.run(generation.prefill, [np.asarray([tokens], dtype=np.int64)])
        logits = np.asarray(generation.logits(outputs, generation.prefill))[0, :-1].astype(np.float64)
        shifted = logits - logits.max(axis=-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        targets = np.asarray(tokens[1:])
        sums.append(-float(log_probs[np.arange(len(targets)), targets].sum()))
        _report({"windows_done": number})
    return {"nll": sums}


def sample(root: Path, request_json: str) -> dict[str, Any]:
    """Images of a sample program drawn on this device: `classes` (one image each, image i
    from seed `seed` + i), `steps`, `guidance`. The images come back as lists of floats."""
    manifest = json.loads((root / "manifest.json").read_text())
    program = manifest["program"]
    if program["kind"] != "sample":
        raise ValueError(f"the artifact's program is {program['kind']!r}, not a sampler")
    request = json.loads(request_json)
    runtime = _runtime(root, manifest)
    sampler = shared.Sampler(program)
    steps, guidance = int(request["steps"]), float(request["guidance"])
    images, began = [], time.perf_counter()
    for i, label in enumerate(request["classes"]):
        start, draws = shared.sample_noise(program, int(request["seed"]) + i, steps)
        images.append(sampler.sample(lambda name, args: runtime.run(name, list(args)), int(label), start, steps, guidance, draws))
        _report({"samples_done": i + 1})
    seconds = time.perf_counter() - began
    return {"machine": platform.machine(), "images": np.concatenate(images).tolist(), "ms_per_sample": seconds * 1e3 / len(images)}


def _per_op_tvm(runtime: shared.Runtime, entry: str, inputs: list[np.ndarray]) -> dict[str, float]:
    """Per-kernel wall time from one instrumented run of the Relax VM."""
    totals: dict[str, float] = {}
    started: dict[str, float] = {}

    def instrument(func: Any, name: str, before_run: bool, ret_value: Any, *args: Any) -> int:
        runtime.device.sync()  # GPU kernels are asynchronous: time each one to completion
        if before_run:
            started[name] = time.perf_counter()
        else:
            totals[name] = totals.get(name, 0.0) + (time.perf_counter() - started.pop(name, time.perf_counter())) * 1e3
        return 0

    vm = runtime.vms[entry]
    vm.set_instrument(instrument)
    try:
        runtime.run(entry, inputs)
    finally:
        vm.set_instrument(None)
    return totals


def _per_op_ort(root: Path, manifest: dict[str, Any], entry: str, inputs: list[np.ndarray], workdir: Path) -> dict[str, float]:
    """Per-operator time from ONNX Runtime's own profiling trace (Chrome trace JSON)."""
    import onnxruntime as ort

    info = manifest["backend_record"]["entries"][entry]
    model_dir = _onnx_model_dir(root)
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(workdir / f"ort-{entry}")
    session = ort.InferenceSession(str(model_dir / info["file"]), options, providers=["CPUExecutionProvider"])
    feed = {i.name: x for i, x in zip(session.get_inputs(), inputs)}
    session.run(None, feed)
    trace = Path(session.end_profiling())
    totals: dict[str, float] = {}
    for event in json.loads(trace.read_text()):
        if event.get("cat") == "Node" and str(event.get("name", "")).endswith("_kernel_time"):
            op = str(event.get("args", {}).get("op_name", "?"))
            totals[op] = totals.get(op, 0.0) + float(event.get("dur", 0)) / 1e3
    trace.unlink()
    return totals


def _report(partial: dict[str, Any]) -> None:
    """A result so far, one JSON line: if the device dies later, the host keeps these."""
    print(json.dumps({"partial": partial}), flush=True)


def profile(root: Path, runs: int, warmup: int, prompt_len: int, new_tokens: int) -> dict[str, Any]:
    """Latency of the program's first entry; for a generate program, prefill on a prompt of
    `prompt_len` tokens and `new_tokens` greedy decode steps with the cache fed back by name."""
    import resource
    import tempfile

    manifest = json.loads((root / "manifest.json").read_text())
    program = manifest["program"]
    reference = shared.read_safetensors(root / manifest["reference"]["file"])
    start = time.perf_counter()
    runtime = _runtime(root, manifest)
    load_ms = (time.perf_counter() - start) * 1e3
    result: dict[str, Any] = {"machine": platform.machine(), "load_ms": load_ms, "versions": _versions()}
    _report(result)
    if program["kind"] == "generate":
        generation = shared.Generation(program)
        ids = shared.profile_prompt(reference, prompt_len)
        entry, inputs = generation.prefill, [ids]
        result["latency"] = shared.percentiles(shared.timed(lambda: runtime.run(entry, inputs), runs, warmup))
        result["prompt_tokens"] = prompt_len
        _report({"latency": result["latency"], "prompt_tokens": prompt_len, "entry": entry})
        decode_ms: list[float] = []

        def run(name: str, args: list[Any]) -> list[np.ndarray]:
            begin = time.perf_counter()
            outputs = runtime.run(name, args, native=True)  # the cache stays in the runtime
            if name == generation.decode:
                decode_ms.append((time.perf_counter() - begin) * 1e3)
            return outputs

        generation.greedy(run, [int(t) for t in ids[0]], new_tokens)  # one decode call per new token
        result["decode"] = shared.percentiles(decode_ms) if decode_ms else None
        result["decode_tokens_per_s"] = 1e3 / float(np.median(decode_ms)) if decode_ms else None
        _report({"decode": result["decode"], "decode_tokens_per_s": result["decode_tokens_per_s"]})
    elif program["kind"] == "steps":
        # The chained parts, timed whole; each part's share from the same runs.
        values = shared.steps_inputs(program, reference)
        parts: dict[str, list[float]] = {}
        result["latency"] = shared.percentiles(shared.timed(
            lambda: shared.run_steps(runtime, program, values, lambda name, ms: parts.setdefault(name, []).append(ms)), runs, warmup))
        result["parts_ms"] = {name: float(np.median(times)) for name, times in parts.items()}
        entry = program["steps"][0]["entry"]
        inputs = [reference[f"{entry}.in.{i}"] for i in range(len(program["entries"][entry]["inputs"]))]
        _report({"latency": result["latency"], "entry": "steps", "parts_ms": result["parts_ms"]})
    else:
        entry = next(iter(program["entries"]))
        count = len(program["entries"][entry]["inputs"])
        inputs = [reference[f"{entry}.in.{i}"] for i in range(count)]
        result["latency"] = shared.percentiles(shared.timed(lambda: runtime.run(entry, inputs), runs, warmup))
        _report({"latency": result["latency"], "entry": entry})
        if program["kind"] == "sample":
            # One whole sample at the program's step count: what a user waits for per image.
            start, draws = shared.sample_noise(program, 0, int(program["steps"]))
            began = time.perf_counter()
            shared.Sampler(program).sample(lambda name, args: runtime.run(name, list(args)), 0, start, int(program["steps"]),
                                           float(program["guidance_scale"]), draws)
            result["sample_ms"] = (time.perf_counter() - began) * 1e3
            result["sample_steps"] = int(program["steps"])
            _report({"sample_ms": result["sample_ms"], "sample_steps": result["sample_steps"]})
    result["entry"] = "steps" if program["kind"] == "steps" else entry
    with tempfile.TemporaryDirectory() as workdir:
        if manifest["backend"] == "tvm":
            result["per_op_ms"] = _per_op_tvm(runtime, entry, inputs)
        else:
            result["per_op_ms"] = _per_op_ort(root, manifest, entry, inputs, Path(workdir))
    # ru_maxrss is in KiB on Linux; under qemu-user it includes the emulator itself.
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


# An upload whose deploy was killed before its rename is this old at least before it is removed,
# so that a deploy still uploading beside this one keeps its temporary directory.
STALE_UPLOAD_S = 3600.0


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def prune(uploads: Path, cap_bytes: int, keep: str | None) -> dict[str, Any]:
    """Remove interrupted uploads, then the least recently uploaded artifacts (never `keep`)
    until the rest fit in `cap_bytes`."""
    import shutil

    removed: list[dict[str, Any]] = []
    entries = [p for p in uploads.iterdir() if p.is_dir()] if uploads.is_dir() else []
    now = time.time()
    for path in entries:
        if path.name.startswith(".") and ".tmp-" in path.name and now - path.stat().st_mtime > STALE_UPLOAD_S:
            removed.append({"name": path.name, "bytes": _size(path)})
            shutil.rmtree(path, ignore_errors=True)
    uploaded = sorted((p for p in entries if not p.name.startswith(".")), key=lambda p: p.stat().st_mtime)
    sizes = {p.name: _size(p) for p in uploaded}
    total = sum(sizes.values())
    for path in uploaded:
        if total <= cap_bytes:
            break
        if path.name == keep:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append({"name": path.name, "bytes": sizes[path.name]})
        total -= sizes[path.name]
    return {"removed": removed, "freed_bytes": sum(r["bytes"] for r in removed), "kept_bytes": total,
            "kept": [p.name for p in uploaded if p.exists()]}


# The agent ran and failed (an exception): the host reports it as a failed check, with
# this error, and keeps "unreachable" for a device that did not answer.
AGENT_FAILED = 3


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] not in ("check", "parity", "profile", "nll", "sample", "prune"):
        print(json.dumps({"error": "usage: agent.py check|parity|profile|nll|sample|prune ARTIFACT_DIR [...]"}))
        return 2
    try:
        result = _command(argv)
    except Exception as exc:  # noqa: BLE001 - whatever the runtime raised, said in one line
        print(json.dumps({"agent_error": shared.one_line(exc, limit=2000)}), flush=True)
        return AGENT_FAILED
    print(json.dumps(result))
    return 0


def _command(argv: list[str]) -> dict[str, Any]:
    root = Path(argv[2])
    if argv[1] == "prune":
        result = prune(root, int(argv[3]), argv[4] if len(argv) > 4 else None)
    elif argv[1] == "check":
        result = check(root, argv[3] if len(argv) > 3 else None)
    elif argv[1] == "parity":
        result = parity(root)
    elif argv[1] == "nll":
        result = nll(root, argv[3])
    elif argv[1] == "sample":
        result = sample(root, argv[3])
    else:
        runs, warmup, prompt_len, new_tokens = (int(x) for x in argv[3:7])
        result = profile(root, runs, warmup, prompt_len, new_tokens)
    return result


if __name__ == "__main__":
    sys.exit(main(sys.argv))
