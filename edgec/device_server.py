"""`edgec device up|status|down`: a stock TVM RPC server inside the emulated aarch64
user space, so rpc:// and tracker:// are tested against what real boards run.

The server (`python3 -m tvm.exec.rpc_server`) forks and execs aarch64 worker
processes; the host kernel runs those through binfmt_misc's qemu-aarch64 entry
(registered by `make demo` / `make test` as root), with QEMU_LD_PREFIX pointing
at the user space. Its state (pid, port, key, log) lives in the cache under
devices/run/. A TVM RPC server runs any code uploaded to it and its key is a
routing label, not a password: edgec binds it to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgec.cache import cache_root
from edgec.errors import BadInputError, DeviceUnreachableError, MissingDependencyError

DEVICES = ("qemu-arm64",)
DEFAULT_PORT = 9091
DEFAULT_KEY = "edgec-qemu-arm64"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
BINFMT_ENTRY = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")
START_TIMEOUT_S = 120.0


def _run_dir() -> Path:
    path = cache_root() / "devices" / "run"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _state_path(device: str, port: int) -> Path:
    return _run_dir() / f"{device}-{port}.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped) still answers kill(0).
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return True


def _port_taken(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _bound(log: Path, host: str, port: int) -> bool:
    """The server's own "bind to HOST:PORT" log line. No probe connection: a server
    registered with a tracker counts a connection as a session and is busy a while."""
    try:
        return f"bind to {host}:{port}" in log.read_text()
    except OSError:
        return False


def known_servers() -> list[dict[str, Any]]:
    """Every server edgec started that is still running (stale state files are removed)."""
    servers = []
    for path in sorted(_run_dir().glob("*.json")):
        try:
            state = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not _alive(int(state["pid"])):
            path.unlink(missing_ok=True)
            continue
        state["listening"] = _bound(Path(state["log"]), state["host"], int(state["port"]))
        servers.append(state)
    return servers


def _require_binfmt() -> None:
    try:
        enabled = BINFMT_ENTRY.read_text().splitlines()[0].strip() == "enabled"
    except OSError:
        enabled = False
    if not enabled:
        raise MissingDependencyError(
            "the emulated device's RPC server starts aarch64 worker processes, which needs binfmt_misc for "
            "qemu-aarch64: run `make demo` as root (it registers it), or `sudo update-binfmts --enable qemu-aarch64`"
        )


def up(
    device: str,
    port: int,
    key: str,
    host: str,
    allow_remote: bool,
    tracker: str | None,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    if device not in DEVICES:
        raise BadInputError(f"edgec device up {device}: unknown device; known: {', '.join(DEVICES)}")
    if host not in LOOPBACK and not allow_remote:
        raise BadInputError(
            f"--host {host}: a TVM RPC server runs any code uploaded to it and its key is no password; "
            "edgec binds to 127.0.0.1 unless you add --allow-remote (then firewall the port)"
        )
    if not 1 <= port <= 65535:
        raise BadInputError(f"--port {port}: not a TCP port")
    for state in known_servers():
        if state["port"] == port:
            raise BadInputError(f"{device} is already up on port {port} (pid {state['pid']}); `edgec device down {device} --port {port}` first")
    if _port_taken(port):
        raise BadInputError(f"--port {port}: something else already listens there; pick another port")
    _require_binfmt()
    from edgec.targets.device_qemu import SITE, ensure_rootfs

    progress(f"{device}: prepare the aarch64 user space (cached after the first time)")
    rootfs = ensure_rootfs()
    log = _run_dir() / f"{device}-{port}.log"
    command = [
        str(rootfs / "usr/bin/python3"), "-m", "tvm.exec.rpc_server",
        "--host", host, "--port", str(port), "--port-end", str(port + 1), "--key", key,
        # Each session in a fresh process: forking the emulated server once it talks to a
        # tracker hangs the child (measured: sessions stalled until their timeout).
        "--no-fork",
    ]
    if tracker:
        command += ["--tracker", tracker]
    env = {**os.environ, "QEMU_LD_PREFIX": str(rootfs), "PYTHONPATH": SITE}
    progress(f"{device}: start a stock TVM RPC server on {host}:{port} (key {key})")
    with log.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    state = {
        "device": device, "pid": process.pid, "host": host, "port": port, "key": key,
        "tracker": tracker, "log": str(log), "emulated": True,
        "uri": f"rpc://{'127.0.0.1' if host in LOOPBACK else host}:{port}?key={key}",
    }
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _bound(log, host, port):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            tail = (log.read_text().strip().splitlines() or ["no output"])[-1]
            raise DeviceUnreachableError(f"{device}: the RPC server did not come up on port {port}: {tail} (log: {log})")
        time.sleep(0.5)
    path = _state_path(device, port)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)
    (_run_dir() / f"{device}-{port}.pid").write_text(f"{process.pid}\n")
    return state


def down(device: str, port: int | None) -> list[dict[str, Any]]:
    stopped = []
    for state in known_servers():
        if state["device"] != device or (port is not None and state["port"] != port):
            continue
        pid = int(state["pid"])
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)
        _state_path(device, int(state["port"])).unlink(missing_ok=True)
        (_run_dir() / f"{device}-{state['port']}.pid").unlink(missing_ok=True)
        stopped.append(state)
    if not stopped:
        which = f" on port {port}" if port is not None else ""
        raise BadInputError(f"{device} is not up{which} (edgec device status lists what is)")
    return stopped
