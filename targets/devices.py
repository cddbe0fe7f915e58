"""Device URIs: where `edgec deploy` and `edgec profile` send an artifact.

    qemu-arm64                          the emulated aarch64 user space (targets/device_qemu.py)
    ssh://user@host[:port]/path[?python=P&identity=KEY&known_hosts=F]
                                        a machine with Python: edgec uploads its agent
    rpc://host:port[?key=K&arch=A&timeout=S&connect_timeout=S]
                                        a stock TVM RPC server (python3 -m tvm.exec.rpc_server)
    tracker://host:port?key=K[&arch=A&timeout=S&connect_timeout=S]
                                        every free server of key K behind a TVM RPC tracker
    (a stock server cannot say what machine it is: arch= declares it, default aarch64;
    timeout= bounds each call on the device, default 600 s; connect_timeout= bounds the
    connection and the RPC handshake, default 180 s, as a stock server starts a worker
    process per session, which under emulation takes a minute when the host is busy;
    past either: exit 6)

Devices with Python (qemu-arm64, ssh) run the device-side agent (targets/agent.py):
hashes, versions, parity, latency, memory and per-op time. A stock TVM RPC server
runs uploaded TVM libraries only, so over rpc:// and tracker:// edgec offers what
the server can do (TVM artifacts, time_evaluator timings) and says what is missing.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qs, urlsplit

from edgec.errors import BadInputError

# What a device with Python runs: the agent, and the runtime and signature check it shares with the host.
AGENT_FILES: tuple[Path, ...] = tuple(Path(__file__).with_name(name) for name in ("agent.py", "runtime.py", "signature.py"))

FORMS = "qemu-arm64, ssh://user@host[:port]/path, rpc://host:port[?key=K], tracker://host:port?key=K"
DEFAULT_RPC_ARCH = "aarch64"
# Seconds one step of the agent (upload check, parity, profile) may take on qemu-arm64 or ssh://.
DEFAULT_TIMEOUT_S = 1800.0


class AgentDevice(Protocol):
    """A device that runs Python: edgec uploads the artifact and its agent, then runs it."""

    name: str
    emulated: bool

    def machine(self) -> str:
        """`uname -m` of the device, asked before anything is uploaded."""
        ...

    @property
    def uploads(self) -> str:
        """The device directory that holds uploaded artifacts."""
        ...

    @property
    def local_uploads(self) -> Path | None:
        """That directory as a path on this machine, where it is one (the emulator's)."""
        ...

    def upload(self, root: Path, name: str, timeout_s: float) -> str:
        """Copy the artifact and the agent to the device (complete or not at all) within
        `timeout_s`; the device path."""
        ...

    def install_agent(self) -> None:
        """Copy the agent files alone (what `device clean` runs)."""
        ...

    def agent_command(self, args: list[str]) -> list[str]:
        """argv that runs `python3 AGENT args...` on the device."""
        ...


@dataclass(frozen=True)
class RpcEndpoint:
    """A TVM RPC server, or a tracker that hands out servers registered under `key`."""

    uri: str
    host: str
    port: int
    key: str
    arch: str
    tracker: bool
    timeout_s: float = 600.0
    connect_timeout_s: float = 180.0
    options: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.uri


def _query(text: str) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(text, keep_blank_values=True).items()}


def _seconds(uri: str, query: dict[str, str], name: str, default: float) -> float:
    try:
        value = float(query.get(name, default))
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise BadInputError(f"--device {uri}: {name}={query[name]!r} is not a positive number of seconds")
    return value


def parse_device(uri: str) -> AgentDevice | RpcEndpoint:
    text = uri.strip()
    if text == "qemu-arm64":
        from edgec.targets.device_qemu import QemuDevice

        return QemuDevice()
    if "://" not in text:
        raise BadInputError(f"--device {uri}: unknown device; known forms: {FORMS}")
    parts = urlsplit(text)
    query = _query(parts.query)
    try:
        port = parts.port
    except ValueError:
        raise BadInputError(f"--device {uri}: the port is not a number") from None
    if parts.scheme in ("rpc", "tracker"):
        if not parts.hostname or port is None:
            raise BadInputError(f"--device {uri}: {parts.scheme}:// needs host:port, e.g. {parts.scheme}://127.0.0.1:9190?key=edgec")
        key = query.get("key", "")
        if parts.scheme == "tracker" and not key:
            raise BadInputError(f"--device {uri}: a tracker hands out servers by key; add ?key=K")
        timeout_s, connect_timeout_s = (_seconds(uri, query, name, default) for name, default in (("timeout", 600), ("connect_timeout", 180)))
        arch = query.get("arch", DEFAULT_RPC_ARCH)
        return RpcEndpoint(text, parts.hostname, port, key, arch, parts.scheme == "tracker", timeout_s, connect_timeout_s)
    if parts.scheme == "ssh":
        from edgec.targets.device_ssh import SshDevice

        if not parts.hostname or not parts.username or not parts.path or parts.path == "/":
            raise BadInputError(f"--device {uri}: ssh:// needs user@host and a directory, e.g. ssh://pi@board.local/home/pi/edgec")
        return SshDevice(
            text, parts.username, parts.hostname, port or 22, parts.path,
            query.get("python", "python3"), query.get("identity"), known_hosts=query.get("known_hosts"),
        )
    raise BadInputError(f"--device {uri}: unknown scheme {parts.scheme!r}; known forms: {FORMS}")


def _kill_group(process: subprocess.Popen[str]) -> None:
    """End the process and whatever it started (it leads its own session)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_streaming(argv: list[str], timeout_s: float, on_line: Callable[[str], None]) -> subprocess.CompletedProcess[str]:
    """Run argv, handing each stdout line to on_line as it arrives (partial results survive a crash)."""
    import threading

    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines: list[str] = []
    stderr: list[str] = []

    def read_err() -> None:
        assert process.stderr is not None
        stderr.append(process.stderr.read())

    reader = threading.Thread(target=read_err, daemon=True)
    reader.start()
    killed = threading.Event()

    def kill() -> None:
        killed.set()
        _kill_group(process)

    timer = threading.Timer(timeout_s, kill)
    timer.start()
    try:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            on_line(line)
        process.wait()
    finally:
        timer.cancel()
        if process.poll() is None:  # interrupted here (a signal): its own session would outlive us
            _kill_group(process)
            process.wait()
        reader.join(timeout=5)
    result = subprocess.CompletedProcess(argv, process.returncode, "".join(lines), "".join(stderr))
    if killed.is_set():
        result.stderr += f"\nno answer within {timeout_s:.0f} s"
    return result
