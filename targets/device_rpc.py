"""Deploy and profile over a stock TVM RPC server (`python3 -m tvm.exec.rpc_server`),
directly (rpc://) or through a TVM RPC tracker (tracker://).

A stock server runs what edgec uploads only as TVM libraries: it has no agent, so
  * file integrity is checked by reading each uploaded file back and hashing it;
  * parity runs the Relax VM remotely on the stored reference inputs;
  * timings come from `time_evaluator` on the device;
  * per-op time, peak memory and runtime versions are unavailable, and say why.
Through a tracker, profiling runs on every free server of the key at once, split
evenly, and the result lists which server measured what.
"""

from __future__ import annotations

import hashlib
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from edgec.artifact import artifact_file, load_reference
from edgec.deploy import check_architecture, checked_locally
from edgec.errors import CheckFailedError, DeviceUnreachableError, UnsupportedError
from edgec.parity import check
from edgec.targets.devices import RpcEndpoint
from edgec.targets.runtime import Generation, percentiles, profile_prompt, shape_program

UNAVAILABLE = {
    "per_op_ms": "per-kernel time needs VirtualMachine.set_instrument with a Python callback on the device; a stock RPC server runs no uploaded Python (use qemu-arm64 or ssh://)",
    "peak_rss_bytes": "a stock RPC server reports no memory use",
    "versions": "a stock RPC server does not report its TVM version; a mismatched runtime fails at load instead",
}


def reachable(endpoint: RpcEndpoint) -> None:
    """Fail in seconds, saying which failure, before TVM's own retry loops start."""
    what = "tracker" if endpoint.tracker else "RPC server"
    try:
        with socket.create_connection((endpoint.host, endpoint.port), timeout=5):
            pass
    except ConnectionRefusedError:
        raise DeviceUnreachableError(f"{endpoint.uri}: connection refused: no {what} listens on {endpoint.host}:{endpoint.port} (start one with `edgec device up`)") from None
    except (TimeoutError, socket.timeout):
        raise DeviceUnreachableError(f"{endpoint.uri}: unreachable: {endpoint.host}:{endpoint.port} did not answer within 5 s") from None
    except OSError as exc:
        raise DeviceUnreachableError(f"{endpoint.uri}: unreachable: {exc.strerror or exc}") from None


class _Expired(BaseException):
    """Raised by SIGALRM inside a stalled RPC call; a BaseException so that no `except
    Exception` on the way (TVM's, ours) turns it into another failure."""


@contextmanager
def waiting(seconds: float, what: str, setting: str) -> Iterator[None]:
    """Exit 6 naming `what` if the block takes longer than `seconds`. TVM's RPC client
    blocks in C++ with no timeout of its own, but a system call interrupted by a signal
    makes it run Python's signal handlers, so SIGALRM's reaches it (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise _Expired

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except _Expired:
        raise DeviceUnreachableError(f"{what}: no answer within {seconds:g} s (set ?{setting}=S in the device URI to wait longer)") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class RemoteTVM:
    """One RPC session holding an artifact's libraries and parameters on the device;
    each call on it is bounded by the endpoint's `timeout=`."""

    def __init__(self, session: Any, server: str, timeout_s: float = 600.0) -> None:
        self.session = session
        self.server = server
        self.timeout_s = timeout_s
        self.device = session.cpu()
        self.vms: dict[str, Any] = {}
        self.params: dict[str, list[Any]] = {}

    def upload(self, root: Path, manifest: dict[str, Any], stored: dict[str, np.ndarray]) -> float:
        """Upload every library, check it by reading it back, load it; the params in `stored`
        go as tensors. Returns load ms."""
        with waiting(self.timeout_s, f"{self.server}: uploading the libraries", "timeout"):
            return self._upload(root, manifest, stored)

    def _upload(self, root: Path, manifest: dict[str, Any], stored: dict[str, np.ndarray]) -> float:
        import tvm
        from tvm.runtime.vm import VirtualMachine

        record = manifest["backend_record"]
        load_ms = 0.0
        cache: dict[str, Any] = {}
        for entry, info in record["entries"].items():
            if info.get("device", "cpu") != "cpu":
                raise UnsupportedError(f"{self.server}: entry {entry} runs on the device's {info['device']}; over TVM RPC edgec "
                                       "runs CPU entries only: deploy it through the device agent (ssh://, or on the machine)")
            relative = f"model/{info['library']}"
            local = artifact_file(root, manifest, relative)
            self.session.upload(str(local), target=info["library"])
            echoed = hashlib.sha256(bytes(self.session.download(info["library"]))).hexdigest()
            if echoed != manifest["files"][relative]:
                raise CheckFailedError(f"{self.server}: corrupted upload ({relative} differs on the device); nothing was run")
            start = time.perf_counter()
            library = self.session.load_module(info["library"])
            load_ms += (time.perf_counter() - start) * 1e3
            self.vms[entry] = VirtualMachine(library, self.device)
            for key in info["params"]:
                if key not in cache:
                    cache[key] = tvm.runtime.tensor(stored[key], self.device)
            self.params[entry] = [cache[key] for key in info["params"]]
        return load_ms

    def _prepare(self, entry: str, inputs: list[Any]) -> Any:
        import tvm

        args = [x if isinstance(x, tvm.runtime.Tensor) else tvm.runtime.tensor(np.asarray(x, order="C"), self.device) for x in inputs]
        vm = self.vms[entry]
        vm.set_input("main", *args, *self.params[entry])
        return vm

    def run_remote(self, entry: str, inputs: list[Any]) -> list[Any]:
        """Outputs stay on the device (decode can take prefill's cache without a round trip)."""
        with waiting(self.timeout_s, f"{self.server}: running {entry}", "timeout"):
            vm = self._prepare(entry, inputs)
            vm.invoke_stateful("main")
            # Not vm.get_outputs: its recursive inner function is a reference cycle holding
            # the VM, so the session stayed open until the garbage collector ran, and the
            # server (one session at a time) kept the next client waiting for up to its timeout.
            arity = vm._get_output_arity("main")
            if arity == -1:
                return [vm._get_output("main")]
            return [vm._get_output("main", index) for index in range(arity)]

    def run(self, entry: str, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return [x.numpy() for x in self.run_remote(entry, inputs)]

    def time_ms(self, entry: str, inputs: list[Any], runs: int, warmup: int) -> list[float]:
        with waiting(self.timeout_s, f"{self.server}: timing {entry}", "timeout"):
            vm = self._prepare(entry, inputs)
            timer = vm.time_evaluator("invoke_stateful", self.device, number=1, repeat=runs + warmup)
            return [float(seconds) * 1e3 for seconds in timer("main").results[warmup:]]


def sessions(endpoint: RpcEndpoint, progress: Callable[[str], None], limit: int | None = None) -> list[RemoteTVM]:
    """A session with the server, or with every free server of the key behind a tracker
    (at most `limit`)."""
    from tvm import rpc

    reachable(endpoint)
    handshake = f"{endpoint.uri}: the {'tracker' if endpoint.tracker else 'RPC server'} accepted the connection but"
    try:
        if not endpoint.tracker:
            with waiting(endpoint.connect_timeout_s, f"{handshake} did not complete the RPC handshake", "connect_timeout"):
                session = rpc.connect(endpoint.host, endpoint.port, key=endpoint.key, session_timeout=int(endpoint.timeout_s))
                server = _server_id(session, f"{endpoint.host}:{endpoint.port}")
            return [RemoteTVM(session, server, endpoint.timeout_s)]
        with waiting(endpoint.connect_timeout_s, f"{handshake} did not answer as a TVM tracker", "connect_timeout"):
            tracker = rpc.connect_tracker(endpoint.host, endpoint.port)
        # + 30 s: the tracker may need that long to hand out a server busy with a session
        with waiting(endpoint.connect_timeout_s + 30, f"{handshake} did not hand out a server", "connect_timeout"):
            return _from_tracker(tracker, endpoint, progress, limit)
    except DeviceUnreachableError:
        raise
    except Exception as exc:  # TVM raises InternalError/RuntimeError with the reason in the text
        text = str(exc)
        if "cannot find server that matches key" in text:
            raise DeviceUnreachableError(f"{endpoint.uri}: wrong key: the server does not accept key {endpoint.key!r}") from None
        raise DeviceUnreachableError(f"{endpoint.uri}: RPC failed: {text.strip().splitlines()[-1] if text.strip() else type(exc).__name__}") from None


def _from_tracker(tracker: Any, endpoint: RpcEndpoint, progress: Callable[[str], None], limit: int | None) -> list[RemoteTVM]:
    def counts() -> tuple[int, int, list[str]]:
        summary = tracker.summary()
        queue = summary.get("queue_info", {})
        # A server keeps its tracker connection through a session but re-offers itself only
        # after the session ends, so `server_info` counts the busy ones too.
        registered = sum(1 for s in summary.get("server_info", []) if s.get("key") == f"server:{endpoint.key}")
        return int(queue.get(endpoint.key, {}).get("free", 0)), registered, sorted(queue)

    free, registered, keys = counts()
    wanted = max(1, registered if limit is None else min(limit, registered))
    deadline = time.monotonic() + 30
    while free < wanted and (endpoint.key in keys or registered) and time.monotonic() < deadline:
        time.sleep(1)  # servers of the key are busy, or re-offering themselves after the last session
        free, registered, keys = counts()
        wanted = max(1, registered if limit is None else min(limit, registered))
    if free == 0:
        raise DeviceUnreachableError(
            f"{endpoint.uri}: the tracker has no free server with key {endpoint.key!r} (keys there: {', '.join(keys) or 'none'})"
        )
    busy = f" ({registered - free} more busy)" if registered > free else ""
    progress(f"{endpoint.uri}: {free} free device(s) with key {endpoint.key}{busy}")
    count = free if limit is None else min(free, limit)
    found = [tracker.request(endpoint.key, session_timeout=int(endpoint.timeout_s), max_retry=2) for _ in range(count)]
    return [RemoteTVM(s, _server_id(s, f"device {i}"), endpoint.timeout_s) for i, s in enumerate(found)]


def _server_id(session: Any, fallback: str) -> str:
    """The server's own work directory: unique per server process, so it tells devices apart."""
    try:
        return str(session.get_function("tvm.rpc.server.workpath")(""))
    except Exception:
        return fallback


def emulated(endpoint: RpcEndpoint) -> bool:
    """True when the server (or, behind a tracker, every server of the key) is one `edgec device up` started."""
    from edgec.device_server import known_servers

    if endpoint.host not in ("127.0.0.1", "localhost"):
        return False
    ours = known_servers()
    if endpoint.tracker:
        return any(s.get("tracker") and s["tracker"].endswith(f":{endpoint.port}") and s["key"] == endpoint.key for s in ours)
    return any(s["port"] == endpoint.port for s in ours)


def _open(root: Path, endpoint: RpcEndpoint, progress: Callable[[str], None]) -> tuple[dict[str, Any], list[RemoteTVM], float]:
    manifest = checked_locally(root)
    if manifest["backend"] != "tvm":
        raise UnsupportedError(
            f"{endpoint.uri}: a stock TVM RPC server runs TVM libraries only; deploy {manifest['backend']} artifacts "
            "to qemu-arm64 or ssh://"
        )
    check_architecture(root, manifest, endpoint.uri, endpoint.arch)
    remotes = sessions(endpoint, progress)
    from safetensors.numpy import load_file

    params_file = manifest["backend_record"]["params_file"]
    stored = load_file(str(artifact_file(root, manifest, f"model/{params_file}")))
    load_ms = 0.0
    for remote in remotes:
        progress(f"{endpoint.uri}: upload to {remote.server}, read back and hash, load")
        load_ms = max(load_ms, remote.upload(root, manifest, stored))
    return manifest, remotes, load_ms


def deploy_rpc(
    root: Path, endpoint: RpcEndpoint, progress: Callable[[str], None], windows: list[list[int]] | None = None
) -> dict[str, Any]:
    manifest, remotes, _ = _open(root, endpoint, progress)
    reference = load_reference(root)
    results = []
    for remote in remotes:
        progress(f"{endpoint.uri}: run the reference inputs and program on {remote.server}")
        results.append(check(remote, manifest, reference))
    worst = max(results, key=lambda r: (not r.ok, (r.max_abs_diff or 0) / (r.tolerance or 1)))
    report: dict[str, Any] = {
        "artifact": str(root),
        "device": endpoint.uri,
        "device_path": ", ".join(r.server for r in remotes),
        "emulated": emulated(endpoint),
        "machine": f"{endpoint.arch} (as declared by the URI; a stock server cannot report it)",
        "versions": {},
        "hashes_ok": True,
        "hash_check": "sha256 of every uploaded library, read back from the device",
        "servers": [r.server for r in remotes],
        "parity": worst.to_json(),
        "unavailable": {"versions": UNAVAILABLE["versions"]},
    }
    if windows:
        from edgec.evaluate import runtime_logits_fn, window_nll

        # A stock server runs no uploaded Python: the logits come back and are scored here.
        remote = remotes[0]
        logits_of = runtime_logits_fn(remote, manifest["program"])
        progress(f"{endpoint.uri}: score {len(windows)} windows on {remote.server}")
        report["window_nll"] = [window_nll(logits_of(np.asarray([tokens], dtype=np.int64))[0], tokens) for tokens in windows]
    return report


def profile_shapes_rpc(
    root: Path, endpoint: RpcEndpoint, runs: int, prompt_len: int, new_tokens: int, progress: Callable[[str], None]
) -> dict[str, dict[str, float]]:
    """Each shape of a `--subnet all` artifact, in one session on one server: p50 of the
    prefill of a `prompt_len`-token prompt and of a decode step after it."""
    manifest, remotes, _ = _open(root, endpoint, progress)
    remote = remotes[0]
    inputs = [profile_prompt(load_reference(root), prompt_len)]
    token = np.asarray([[int(inputs[0][0, -1])]], dtype=np.int64)
    measured: dict[str, dict[str, float]] = {}
    for number, label in enumerate(manifest["program"]["shapes"], 1):
        progress(f"{endpoint.uri}: shape {number}/{len(manifest['program']['shapes'])}, {label}: 1 warm-up + {runs} timed runs")
        generation = Generation(shape_program(manifest["program"], label))
        prefill = remote.time_ms(generation.prefill, inputs, runs, 1)
        outputs = remote.run_remote(generation.prefill, inputs)
        decode = remote.time_ms(generation.decode, generation.decode_args(token, outputs, generation.prefill), new_tokens, 1)
        measured[label] = {"prefill_ms": float(np.median(prefill)), "decode_ms": float(np.median(decode))}
    return measured


def profile_rpc(
    root: Path, endpoint: RpcEndpoint, runs: int, warmup: int, prompt_len: int, new_tokens: int, progress: Callable[[str], None]
) -> dict[str, Any]:
    manifest, remotes, load_ms = _open(root, endpoint, progress)
    program = manifest["program"]
    is_lm = program["kind"] == "generate"
    reference = load_reference(root)
    if is_lm:
        generation = Generation(program)
        entry, inputs = generation.prefill, [profile_prompt(reference, prompt_len)]
    else:
        entry = next(iter(program["entries"]))
        inputs = [reference[f"{entry}.in.{i}"] for i in range(len(program["entries"][entry]["inputs"]))]
    share = [runs // len(remotes) + (1 if i < runs % len(remotes) else 0) for i in range(len(remotes))]
    latency: list[float] = []
    decode: list[float] = []
    served = []
    for remote, count in zip(remotes, share):
        if count == 0:
            continue
        progress(f"{endpoint.uri}: {warmup} warm-up + {count} timed runs on {remote.server}")
        times = remote.time_ms(entry, inputs, count, warmup)
        latency += times
        served.append({"server": remote.server, "runs": len(times), "p50_ms": float(np.median(times))})
    if is_lm and new_tokens > 0:
        remote = remotes[0]
        # The cache stays on the device: the prefill outputs feed decode by name.
        outputs = remote.run_remote(generation.prefill, inputs)
        token = np.asarray([[int(inputs[0][0, -1])]], dtype=np.int64)
        args = generation.decode_args(token, outputs, generation.prefill)
        decode = remote.time_ms(generation.decode, args, new_tokens, 1)
    result: dict[str, Any] = {
        "artifact": str(root),
        "device": endpoint.uri,
        "backend": "tvm",
        "emulated": emulated(endpoint),
        "size_bytes": manifest["size_bytes"],
        "entry": entry,
        "latency": percentiles(latency),
        # Not the agent's load_ms (libraries + weights + VM): not comparable, so named apart.
        "library_load_ms": load_ms,
        "library_load_note": "remote load_module of the libraries, seen from the host (RPC round trips included)",
        "devices": served,
        "unavailable": dict(UNAVAILABLE),
        "complete": True,
    }
    result["note"] = (
        "emulated (qemu-user on x86-64) behind a stock TVM RPC server: not ARM performance"
        if result["emulated"]
        else f"measured by time_evaluator on {endpoint.uri}"
    )
    if is_lm:
        result["prompt_tokens"] = prompt_len
        if decode:
            result["decode"] = percentiles(decode)
            result["decode_tokens_per_s"] = 1e3 / float(np.median(decode))
            result["decode_note"] = f"one decode step after the {prompt_len}-token prompt, repeated by time_evaluator"
    return result
