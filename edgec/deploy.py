"""`edgec deploy`: upload an artifact to a device, check it there, run parity there.

Devices so far: `qemu-arm64`, the emulated aarch64 user space of
edgec.targets.device_qemu. The device-side work is done by targets/agent.py,
uploaded next to the artifact (standard library + numpy + the TVM runtime /
ONNX Runtime only). Figures from it are emulation, and every result says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgec.artifact import MANIFEST, check_hashes, read_manifest
from edgec.errors import BadInputError, CheckFailedError, DeviceUnreachableError, UnsupportedError

KNOWN_DEVICES = ("qemu-arm64",)
DEVICE_ARCH = {"qemu-arm64": "aarch64"}
DEVICE_ROOT = "opt/edgec"


def _agent_source() -> Path:
    from edgec.targets import agent

    return Path(agent.__file__)


def _upload(root: Path, rootfs: Path, name: str) -> str:
    """Copy into the device's file system via a temporary sibling; returns the device path."""
    parent = rootfs / DEVICE_ROOT / "artifacts"
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent))
    try:
        for item in root.iterdir():
            target = tmp / item.name
            if item.is_dir():
                shutil.copytree(item, target)
            else:
                shutil.copy2(item, target)
        final = parent / name
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    shutil.copy2(_agent_source(), rootfs / DEVICE_ROOT / "agent.py")
    return f"/{DEVICE_ROOT}/artifacts/{name}"


def _agent(rootfs: Path, command: str, device_dir: str, timeout_s: float, extra: list[str]) -> dict[str, Any]:
    from edgec.targets.device_qemu import run_python

    result = run_python(rootfs, [f"/{DEVICE_ROOT}/agent.py", command, device_dir, *extra], timeout_s)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise DeviceUnreachableError(f"qemu-arm64: the device agent failed on `{command}` (exit {result.returncode}): {last}")
    try:
        return json.loads(result.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        raise DeviceUnreachableError(f"qemu-arm64: the device agent answered `{command}` with no JSON") from None


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


@dataclass
class DeviceSession:
    """An artifact uploaded to a device and checked there."""

    manifest: dict[str, Any]
    device: str
    rootfs: Path
    device_dir: str
    check: dict[str, Any]
    timeout_s: float

    def agent(self, command: str, *args: str) -> dict[str, Any]:
        return _agent(self.rootfs, command, self.device_dir, self.timeout_s, list(args))


def upload_and_check(root: Path, device: str, progress: Callable[[str], None], timeout_s: float = 1800.0) -> DeviceSession:
    """Refuse a wrong architecture before uploading; upload; check hashes and runtime versions on the device."""
    manifest = read_manifest(root)
    if device not in KNOWN_DEVICES:
        raise BadInputError(f"--device {device}: unknown device; known: {', '.join(KNOWN_DEVICES)}")
    device_arch = DEVICE_ARCH[device]
    artifact_arch = manifest["target"]["arch"]
    if artifact_arch != device_arch:
        raise UnsupportedError(
            f"{root} is built for {manifest['target']['name']} ({artifact_arch}) but {device} is {device_arch}; "
            "recompile with --target arm64"
        )
    hashes = check_hashes(root, manifest)
    if not hashes.ok:
        raise CheckFailedError(f"{root} does not match its manifest ({', '.join(hashes.mismatched + hashes.missing)}); nothing uploaded")
    from edgec.targets.device_qemu import ensure_rootfs

    progress(f"{device}: prepare the aarch64 user space (cached after the first time)")
    rootfs = ensure_rootfs()
    digest = hashlib.sha256((root / MANIFEST).read_bytes()).hexdigest()[:12]
    progress(f"{device}: upload {manifest['size_bytes'] / 1e6:.1f} MB")
    device_dir = _upload(root, rootfs, f"{root.name}-{digest}")
    progress(f"{device}: check files and runtime versions on the device")
    check = _agent(rootfs, "check", device_dir, timeout_s, [])
    if check["machine"] != device_arch:
        raise DeviceUnreachableError(f"{device} reports machine {check['machine']}, expected {device_arch}")
    if not check["hashes_ok"]:
        raise CheckFailedError(f"{device}: corrupted upload ({', '.join(check['mismatched'])} differ on the device); nothing was run")
    problems = _check_versions(manifest, check["versions"])
    if problems:
        raise UnsupportedError(f"{device}: " + "; ".join(problems))
    return DeviceSession(manifest, device, rootfs, device_dir, check, timeout_s)


def deploy(root: Path, device: str, progress: Callable[[str], None], timeout_s: float = 1800.0) -> dict[str, Any]:
    session = upload_and_check(root, device, progress, timeout_s)
    progress(f"{device}: run the reference inputs (emulated: slow, and not ARM performance)")
    parity = session.agent("parity")
    return {
        "artifact": str(root),
        "device": device,
        "device_path": session.device_dir,
        "emulated": True,
        "machine": session.check["machine"],
        "versions": session.check["versions"],
        "hashes_ok": True,
        "parity": parity,
    }
