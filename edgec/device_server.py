"""`edgec device up|status|down`: a stock TVM RPC server inside the emulated aarch64
user space, so rpc:// and tracker:// are tested against what real boards run.

The server (`python3 -m tvm.exec.rpc_server`) forks and execs aarch64 worker
processes; the host kernel runs those through binfmt_misc's qemu-aarch64 entry
(registered by `make demo` / `make test` as root), with QEMU_LD_PREFIX pointing
at the user space. Its state (pid, port, key, log) lives in the cache under
devices/run/. A TVM RPC server runs any code uploaded to it and its key is a
routing label, not a password: edgec binds it to 127.0.0.1 unless told otherwise.

The process edgec starts is not the one that listens: the stock server hands the
socket to a worker process it spawns, and each session runs in another. So a
server is its whole process group (edgec starts it as a session leader), each
member checked to be running the user space's python before anything is killed,
and "listening" is read from the kernel's socket table for the port.
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
from edgec.locks import exclusive

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


def _stat(pid: str) -> tuple[str, int]:
    """A process's state letter and process group, from /proc/PID/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[2])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _members(pgid: int, marker: str) -> list[int]:
    """Live processes of the group whose command line names `marker` (the user space the
    server runs from): the leader may be gone while a worker it spawned still listens, and a
    recycled pid of some other program is never taken for the server."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, group = _stat(entry.name)
        except (OSError, ValueError, IndexError):
            continue
        if group == pgid and state != "Z" and marker in _cmdline(int(entry.name)):
            members.append(int(entry.name))
    return sorted(members)


def _group_alive(pgid: int) -> bool:
    """Some process of the group still has a running thread. An exiting process drops its
    command line (its memory) before its sockets, and its main thread can be a zombie while
    other threads still hold them: waiting on `_members` alone returned while the port was
    still listened on."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if _stat(entry.name)[1] != pgid:
                continue
            if any(_stat(f"{entry.name}/task/{task.name}")[0] not in "ZX" for task in (entry / "task").iterdir()):
                return True
        except (OSError, ValueError, IndexError):
            continue
    return False


def _listeners(port: int) -> set[int]:
    """Processes holding a listening TCP socket on `port`, from the kernel's tables (no
    connection is made: a server registered with a tracker counts one as a session)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    holders: set[int] = set()
    if not inodes:
        return holders
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            links = [os.readlink(fd) for fd in (entry / "fd").iterdir()]
        except OSError:
            continue
        if inodes & set(links):
            holders.add(int(entry.name))
    return holders


def _port_taken(port: int) -> bool:
    """Something listens on the port. Connections of an earlier server still in TIME_WAIT do
    not count: the stock server binds with SO_REUSEADDR, and so does this probe."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def known_servers() -> list[dict[str, Any]]:
    """Every server edgec started that still has a process (stale state files are removed),
    with its live `pids` and whether one of them listens on its port."""
    servers = []
    for path in sorted(_run_dir().glob("*.json")):
        try:
            state = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        pids = _members(int(state["pid"]), state.get("rootfs", "tvm.exec.rpc_server"))
        if not pids:
            path.unlink(missing_ok=True)
            path.with_suffix(".pid").unlink(missing_ok=True)
            continue
        state["pids"] = pids
        state["listening"] = bool(_listeners(int(state["port"])) & set(pids))
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
    with exclusive(_run_dir() / f"{device}-{port}.lock",
                   lambda holder: f"another `edgec device up` is starting {device} on port {port} ({holder}); "
                                  "wait for it (edgec device status) or pick another port"):
        return _start(device, port, key, host, tracker, progress)


def _start(device: str, port: int, key: str, host: str, tracker: str | None, progress: Callable[[str], None]) -> dict[str, Any]:
    for state in known_servers():
        if state["port"] == port:
            raise BadInputError(f"{device} is already up on port {port} (pid {state['pid']}); `edgec device down {device} --port {port}` first")
    if _port_taken(port):
        raise BadInputError(f"--port {port}: something else already listens there; pick another port")
    _require_binfmt()
    from edgec.targets.device_qemu import CPU, SITE, ensure_rootfs

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
    env = {**os.environ, "QEMU_LD_PREFIX": str(rootfs), "QEMU_CPU": CPU, "PYTHONPATH": SITE}
    progress(f"{device}: start a stock TVM RPC server on {host}:{port} (key {key})")
    with log.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    state = {
        "device": device, "pid": process.pid, "host": host, "port": port, "key": key,
        "tracker": tracker, "log": str(log), "emulated": True, "rootfs": str(rootfs),
        "uri": f"rpc://{'127.0.0.1' if host in LOOPBACK else host}:{port}?key={key}",
    }
    # Recorded before it listens, so a server whose `up` is killed meanwhile is still found.
    path = _state_path(device, port)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)
    path.with_suffix(".pid").write_text(f"{process.pid}\n")
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _listeners(port) & set(_members(process.pid, str(rootfs))):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = (log.read_text().strip().splitlines() or ["no output"])[-1]
                raise DeviceUnreachableError(f"{device}: the RPC server did not come up on port {port}: {tail} (log: {log})")
            time.sleep(0.5)
    except BaseException:  # also Ctrl-C and SIGTERM: no server is left behind
        _stop(state)
        raise
    return state


def _stop(state: dict[str, Any]) -> None:
    """End the server's process group, then forget it. The group is checked to be the
    server's (`_members`) before it is signalled; then every process of it is waited for,
    down to its last thread, so the port is free when this returns."""
    pgid, marker = int(state["pid"]), state.get("rootfs", "tvm.exec.rpc_server")
    if _members(pgid, marker):
        for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait_s
            while _group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if not _group_alive(pgid):
                break
    path = _state_path(state["device"], int(state["port"]))
    path.unlink(missing_ok=True)
    path.with_suffix(".pid").unlink(missing_ok=True)


def down(device: str, port: int | None) -> list[dict[str, Any]]:
    stopped = []
    for state in known_servers():
        if state["device"] != device or (port is not None and state["port"] != port):
            continue
        _stop(state)
        stopped.append(state)
    if not stopped:
        which = f" on port {port}" if port is not None else ""
        raise BadInputError(f"{device} is not up{which} (edgec device status lists what is)")
    return stopped
