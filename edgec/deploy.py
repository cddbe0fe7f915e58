"""`edgec deploy`: upload an artifact to a device, check it there, run parity there.

Devices (edgec.targets.devices): `qemu-arm64` and `ssh://` run edgec's device-side
agent (targets/agent.py, uploaded next to the artifact: standard library + numpy
+ the TVM runtime / ONNX Runtime only); `rpc://` and `tracker://` are stock TVM
RPC servers (edgec.targets.device_rpc). Figures from emulation say so.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgec.artifact import MANIFEST, check_hashes, read_manifest
from edgec.errors import BadInputError, CheckFailedError, DeviceUnreachableError, UnsupportedError
from edgec.targets.agent import AGENT_FAILED
from edgec.targets.devices import DEFAULT_TIMEOUT_S, AgentDevice, RpcEndpoint, parse_device, run_streaming
from edgec.targets.signature import fingerprint, signature_problem


class DeviceDied(DeviceUnreachableError):
    """The device stopped answering mid-command; `partial` holds what it reported first."""

    def __init__(self, message: str, partial: dict[str, Any]) -> None:
        super().__init__(message)
        self.partial = partial


def _check_versions(manifest: dict[str, Any], versions: dict[str, str]) -> list[str]:
    problems = []
    if manifest["backend"] == "tvm" and versions.get("tvm") != manifest["tools"].get("apache-tvm"):
        problems.append(f"TVM runtime {versions.get('tvm')} on the device, artifact built with {manifest['tools'].get('apache-tvm')}")
    if manifest["backend"] == "onnx":
        have = versions.get("onnxruntime", "missing")
        need = manifest["backend_record"].get("ort_version_built_with", "0")
        if have == "missing" or tuple(int(x) for x in have.split(".")[:2]) < tuple(int(x) for x in need.split(".")[:2]):
            problems.append(f"ONNX Runtime {have} on the device, artifact needs >= {need}")
    return problems


def check_architecture(root: Path, manifest: dict[str, Any], device_name: str, device_arch: str) -> None:
    artifact_arch = manifest["target"]["arch"]
    if artifact_arch != device_arch:
        hint = "--target arm64" if device_arch == "aarch64" else "--target x86_64" if device_arch == "x86_64" else f"a {device_arch} target"
        raise UnsupportedError(
            f"{root} is built for {manifest['target']['name']} ({artifact_arch}) but {device_name} is {device_arch}; "
            f"recompile with {hint}"
        )


def checked_locally(root: Path) -> dict[str, Any]:
    """The artifact's manifest, after its files were checked against it here (nothing uploaded yet)."""
    manifest = read_manifest(root)
    hashes = check_hashes(root, manifest)
    if not hashes.ok:
        problems = ([f"changed: {n}" for n in hashes.mismatched] + [f"missing: {n}" for n in hashes.missing]
                    + [f"not in the manifest: {n}" for n in hashes.unexpected])
        raise CheckFailedError(f"{root} does not match its manifest ({', '.join(problems)}); nothing uploaded")
    return manifest


@dataclass
class DeviceSession:
    """An artifact uploaded to an agent device and checked there."""

    manifest: dict[str, Any]
    device: AgentDevice
    device_dir: str
    check: dict[str, Any]
    timeout_s: float
    partial: dict[str, Any] = field(default_factory=dict)

    def agent(self, command: str, *args: str, on_partial: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        return run_agent(self.device, command, self.device_dir, list(args), self.timeout_s, self.partial, on_partial)


def run_agent(
    device: AgentDevice, command: str, device_dir: str, extra: list[str], timeout_s: float, partial: dict[str, Any] | None = None,
    on_partial: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the agent; lines {"partial": {...}} it prints on the way are merged into `partial`
    (and shown to `on_partial` as they arrive)."""
    partial = {} if partial is None else partial

    def on_line(line: str) -> None:
        try:
            message = json.loads(line)
        except json.JSONDecodeError:
            return
        if isinstance(message, dict) and isinstance(message.get("partial"), dict):
            partial.update(message["partial"])
            if on_partial is not None:
                on_partial(message["partial"])

    result = run_streaming(device.agent_command([command, device_dir, *extra]), timeout_s, on_line)
    if result.returncode == AGENT_FAILED:
        said = next((m["agent_error"] for m in map(_json_or_none, reversed(result.stdout.splitlines()))
                     if isinstance(m, dict) and "agent_error" in m), None)
        if said is not None:  # the device answered: what failed there was the artifact's run
            raise CheckFailedError(f"{device.name}: `{command}` failed on the device: {said}")
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or [f"killed by signal {-result.returncode}" if result.returncode < 0 else "no output"])[-1]
        raise DeviceDied(f"{device.name}: the device agent stopped during `{command}` (exit {result.returncode}): {last}", partial)
    for line in reversed(result.stdout.strip().splitlines()):
        try:
            answer = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(answer, dict) and "partial" not in answer:
            return answer
    raise DeviceUnreachableError(f"{device.name}: the device agent answered `{command}` with no JSON")


def _json_or_none(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def upload_and_check(
    root: Path, device: AgentDevice, progress: Callable[[str], None], timeout_s: float = DEFAULT_TIMEOUT_S, trusted: str | None = None,
) -> DeviceSession:
    """Refuse a wrong architecture before uploading; upload; check the signature (with
    `trusted`, an ed25519 public key in hex), hashes, runtime versions and ISA features on the device."""
    cap_mb = uploads_cap_mb()
    manifest = checked_locally(root)
    if manifest["target"]["arch"] != "cuda":  # a GPU is found by the agent's check, on the device
        progress(f"{device.name}: ask the device what it is")
        check_architecture(root, manifest, device.name, device.machine())
    digest = hashlib.sha256((root / MANIFEST).read_bytes()).hexdigest()[:12]
    progress(f"{device.name}: upload {manifest['size_bytes'] / 1e6:.1f} MB")
    device_dir = device.upload(root, f"{root.name}-{digest}", timeout_s)
    signed = "the signature, " if trusted is not None else ""
    progress(f"{device.name}: check {signed}files, runtime versions and CPU features on the device")
    check = run_agent(device, "check", device_dir, [trusted] if trusted is not None else [], timeout_s)
    if trusted is not None and check.get("signature_ok") is not True:
        problem = check.get("signature_problem", "the device's agent did not check the signature")
        raise CheckFailedError(f"{device.name}: {problem}; nothing was run")
    if not check["hashes_ok"]:
        raise CheckFailedError(f"{device.name}: corrupted upload ({', '.join(check['mismatched'])} differ on the device); nothing was run")
    problems = _check_versions(manifest, check["versions"])
    if check.get("missing_features"):
        problems.append(f"the artifact needs features the device lacks: {', '.join(check['missing_features'])}")
    if problems:
        raise UnsupportedError(f"{device.name}: " + "; ".join(problems))
    session = DeviceSession(manifest, device, device_dir, check, timeout_s)
    pruned = prune_uploads(device, cap_mb, timeout_s, keep=device_dir.rsplit("/", 1)[-1])
    if pruned["removed"]:
        progress(f"{device.name}: removed {len(pruned['removed'])} older upload(s), {pruned['freed_bytes'] / 1e6:.0f} MB, "
                 f"to keep uploads under {cap_mb} MB ({UPLOADS_CAP_ENV})")
    return session


UPLOADS_CAP_ENV = "EDGEC_DEVICE_UPLOADS_MB"
UPLOADS_CAP_MB = 2048


def check_signature_here(root: Path, trusted: str | None) -> str | None:
    """For a stock RPC server, which runs no edgec code: the signature is checked on this
    machine before anything is uploaded."""
    if trusted is None:
        return None
    problem = signature_problem(root, trusted)
    if problem is not None:
        raise CheckFailedError(f"{root}: {problem}; nothing was uploaded")
    return f"signed by {fingerprint(trusted)}, checked on this machine (a stock RPC server runs no edgec code)"


def uploads_cap_mb() -> int:
    """How much a device keeps of earlier uploads (the newest first) after each deploy."""
    text = os.environ.get(UPLOADS_CAP_ENV, str(UPLOADS_CAP_MB))
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise BadInputError(f"{UPLOADS_CAP_ENV}={text!r}: give a whole number of megabytes (0 keeps only the newest upload)")
    return value


def prune_uploads(device: AgentDevice, cap_mb: int, timeout_s: float, keep: str | None = None) -> dict[str, Any]:
    """Remove interrupted uploads and the oldest artifacts on the device (never `keep`) until
    the rest fit in `cap_mb`, with the agent's own code: here when the device's files are on
    this machine (the emulator's), else by the agent on the device."""
    if device.local_uploads is not None:
        from edgec.targets.agent import prune

        return prune(device.local_uploads, cap_mb * 1_000_000, keep)
    return run_agent(device, "prune", device.uploads, [str(cap_mb * 1_000_000), *([keep] if keep else [])], timeout_s)


def open_device(spec: str) -> AgentDevice | RpcEndpoint:
    if not spec.strip():
        raise BadInputError("--device is empty; use qemu-arm64, ssh://..., rpc://... or tracker://...")
    return parse_device(spec)


def deploy(
    root: Path,
    device_spec: str,
    progress: Callable[[str], None],
    timeout_s: float = DEFAULT_TIMEOUT_S,
    windows: list[list[int]] | None = None,
    trusted: str | None = None,
) -> dict[str, Any]:
    """Upload, check and run the reference inputs on the device. With `windows` (token
    windows of a causal LM), also their summed NLL per window, as `window_nll`. With
    `trusted` (an ed25519 public key, hex), nothing runs unless the artifact is signed by it."""
    device = open_device(device_spec)
    if isinstance(device, RpcEndpoint):
        from edgec.targets.device_rpc import deploy_rpc

        signature = check_signature_here(root, trusted)
        return {**deploy_rpc(root, device, progress, windows), **({"signature": signature} if signature else {})}
    session = upload_and_check(root, device, progress, timeout_s, trusted)
    slow = " (emulated: slow, and not ARM performance)" if device.emulated else ""
    progress(f"{device.name}: run the reference inputs{slow}")
    parity = session.agent("parity")
    report: dict[str, Any] = {
        "artifact": str(root),
        "device": device.name,
        "device_path": session.device_dir,
        "emulated": device.emulated,
        "machine": session.check["machine"],
        "versions": session.check["versions"],
        "hashes_ok": True,
        "hash_check": "sha256 of every file, computed on the device",
        "parity": parity,
    }
    if trusted is not None:
        report["signature"] = f"signed by {fingerprint(trusted)}, checked on the device"
    if windows:
        report["window_nll"] = []
        for chunk in _chunks(windows, NLL_TOKENS_PER_CALL):
            done = len(report["window_nll"])
            progress(f"{device.name}: score windows {done + 1}-{done + len(chunk)} of {len(windows)}{slow}")
            report["window_nll"] += session.agent("nll", json.dumps(chunk))["nll"]
    return report


def sample_on_device(root: Path, device_spec: str, request: dict[str, Any], progress: Callable[[str], None],
                     timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """Upload and check the artifact, then draw a sample program's images on the device
    (`request`: classes, seed, steps, guidance); the images come back [N, C, H, W]."""
    import numpy as np

    device = open_device(device_spec)
    if isinstance(device, RpcEndpoint):
        raise UnsupportedError(f"{device_spec}: `run --device` draws samples through edgec's agent (qemu-arm64, ssh://); "
                               "a stock RPC server gives `deploy` and `profile`")
    session = upload_and_check(root, device, progress, timeout_s)
    slow = " (emulated: slow, and not ARM performance)" if device.emulated else ""
    progress(f"{device.name}: draw {len(request['classes'])} sample(s), {request['steps']} steps each{slow}")
    answer = session.agent("sample", json.dumps(request))
    return {"device": device.name, "emulated": device.emulated, "machine": answer["machine"],
            "images": np.asarray(answer["images"], dtype=np.float32), "ms_per_sample": answer["ms_per_sample"]}


# The windows travel as one command-line argument: stay well under Linux's 128 KiB per argument.
NLL_TOKENS_PER_CALL = 8192


def _chunks(windows: list[list[int]], tokens: int) -> list[list[list[int]]]:
    chunks: list[list[list[int]]] = [[]]
    for window in windows:
        if chunks[-1] and sum(map(len, chunks[-1])) + len(window) > tokens:
            chunks.append([])
        chunks[-1].append(window)
    return chunks
