"""A real device reached over SSH: any machine with sshd, Python 3, numpy and the
TVM runtime or ONNX Runtime (a Raspberry Pi, a Jetson, an x86 box).

`--device ssh://user@host[:port]/dir[?python=P&identity=KEY&known_hosts=FILE]`:
the artifact is streamed as a tar into DIR/artifacts/NAME (unpacked beside it,
then renamed, so the device never sees half an artifact), the agent goes to
DIR/agent.py, and every command runs as `ssh ... 'P DIR/agent.py ARGS'`.
Only the `ssh` client and `tar` are needed here; nothing is installed there.
"""

from __future__ import annotations

import secrets
import shlex
import shutil
import subprocess
from pathlib import Path

from edgec.errors import DeviceUnreachableError, MissingDependencyError

# ssh exits 255 when it (not the remote command) failed: no route, refused, auth, host key.
SSH_FAILED = 255
MACHINE_TIMEOUT_S = 60.0


class SshDevice:
    """A machine with Python behind sshd; the agent runs there as the URI's user."""

    emulated = False
    local_uploads = None  # the uploads live on the remote machine: the agent prunes them there

    def __init__(
        self,
        uri: str,
        user: str,
        host: str,
        port: int,
        path: str,
        python: str,
        identity: str | None,
        *,
        known_hosts: str | None = None,
    ) -> None:
        self.name = uri
        self.user = user
        self.host = host
        self.port = port
        # A trailing slash would make "DIR//artifacts" paths in messages; the device does not care.
        self.path = path.rstrip("/") or "/"
        self.python = python
        self.identity = identity
        self.known_hosts = known_hosts

    def _ssh(self) -> list[str]:
        ssh = shutil.which("ssh")
        if ssh is None:
            raise MissingDependencyError(f"--device {self.name} needs the ssh client; install it (Debian openssh-client)")
        argv = [
            ssh, "-p", str(self.port),
            # Never prompt: a password or passphrase prompt would hang a non-interactive deploy.
            "-o", "BatchMode=yes",
            "-o", "ConnectTimeout=10",
            "-o", "StrictHostKeyChecking=accept-new",
            # Notice a device that dies mid-run within a minute instead of waiting for the run's timeout.
            "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4",
            # Keeps "Permanently added ... to known hosts" out of stderr, whose last line names failures.
            "-o", "LogLevel=ERROR",
        ]
        if self.identity:
            # Only this key: keys from an ssh-agent would be tried first and can exhaust MaxAuthTries.
            argv += ["-i", self.identity, "-o", "IdentitiesOnly=yes"]
        if self.known_hosts:
            argv += ["-o", f"UserKnownHostsFile={self.known_hosts}"]
        return [*argv, f"{self.user}@{self.host}", "--"]

    def _unreachable(self, what: str, stderr: str | bytes) -> DeviceUnreachableError:
        text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr
        last = (text.strip().splitlines() or ["ssh failed with no message"])[-1].strip()
        return DeviceUnreachableError(f"{self.name}: {what}: {last}")

    def machine(self) -> str:
        try:
            result = subprocess.run(
                [*self._ssh(), "uname -m"], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=MACHINE_TIMEOUT_S
            )
        except subprocess.TimeoutExpired:
            raise DeviceUnreachableError(f"{self.name}: no answer to `uname -m` within {MACHINE_TIMEOUT_S:.0f} s") from None
        machine = result.stdout.strip()
        if result.returncode != 0 or not machine:
            raise self._unreachable("cannot ask the device what it is" if result.returncode == SSH_FAILED else "`uname -m` failed", result.stderr)
        return machine

    @property
    def uploads(self) -> str:
        return f"{self.path}/artifacts"

    def upload(self, root: Path, name: str, timeout_s: float) -> str:
        """Stream `root` as a tar into a temporary sibling, then swap it in; returns the device path."""
        parent = self.uploads
        final = f"{parent}/{name}"
        tmp = f"{parent}/.{name}.tmp-{secrets.token_hex(4)}"
        q_parent, q_final, q_tmp = shlex.quote(parent), shlex.quote(final), shlex.quote(tmp)
        # `mv` onto an existing directory would move into it, hence rm -rf first; a failed
        # extraction (dropped connection, full disk) leaves no temporary behind.
        remote = (
            f"mkdir -p {q_tmp} && tar -xf - -C {q_tmp} && rm -rf {q_final} && mv {q_tmp} {q_final}"
            f" || {{ rm -rf {q_tmp}; exit 1; }}"
        )
        ssh = self._ssh()
        tar = subprocess.Popen(["tar", "-C", str(root), "-cf", "-", "."], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert tar.stdout is not None
        try:
            sent = subprocess.run([*ssh, f"mkdir -p {q_parent} && {remote}"], stdin=tar.stdout, capture_output=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            tar.kill()
            raise DeviceUnreachableError(
                f"{self.name}: the upload of {root} did not finish within {timeout_s:.0f} s (--timeout S); nothing was run, "
                "and what reached the device is removed there or by a later deploy's clean-up"
            ) from None
        finally:
            # Closed here so tar gets SIGPIPE instead of blocking if ssh exits early.
            tar.stdout.close()
            tar_err = tar.stderr.read() if tar.stderr else b""
            tar.wait()
        if sent.returncode == SSH_FAILED:
            raise self._unreachable("upload failed", sent.stderr)
        if tar.returncode != 0:
            raise self._unreachable(f"cannot read {root} to upload it", tar_err)
        if sent.returncode != 0:
            raise self._unreachable(f"unpacking into {final} failed", sent.stderr)
        self.install_agent()
        return final

    def install_agent(self) -> None:
        """The agent files, each swapped in whole, so a concurrent deploy never runs half a file."""
        from edgec.targets.devices import AGENT_FILES

        ssh = self._ssh()
        for source_path in AGENT_FILES:
            remote_path = f"{self.path}/{source_path.name}"
            remote_tmp = f"{remote_path}.tmp-{secrets.token_hex(4)}"
            with open(source_path, "rb") as source:
                copied = subprocess.run(
                    [*ssh, f"mkdir -p {shlex.quote(self.path)} && cat > {shlex.quote(remote_tmp)}"
                           f" && mv {shlex.quote(remote_tmp)} {shlex.quote(remote_path)}"],
                    stdin=source,
                    capture_output=True,
                )
            if copied.returncode != 0:
                raise self._unreachable(f"copying the agent to {remote_path} failed", copied.stderr)

    def agent_command(self, args: list[str]) -> list[str]:
        # ssh hands the remote shell one string, so every word is quoted for it.
        remote = " ".join(shlex.quote(word) for word in [self.python, f"{self.path}/agent.py", *args])
        return [*self._ssh(), remote]
