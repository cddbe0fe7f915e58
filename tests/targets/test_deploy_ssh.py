"""edgec deploy over ssh:// against a real sshd: a private one on 127.0.0.1, so this
machine is the device. Artifacts for the host pass parity there; a wrong key, a closed
port and an arm64 artifact are refused with the documented exit codes."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgec.cli import app
from edgec.errors import MissingDependencyError
from edgec.targets.device_ssh import SshDevice
from tests.conftest import free_port, wait_for_port

pytestmark = pytest.mark.compile
runner = CliRunner()
SSHD = Path("/usr/sbin/sshd")


@dataclass(frozen=True)
class Sshd:
    port: int
    key: Path
    wrong_key: Path
    known_hosts: Path
    device_dir: Path

    def uri(self, key: Path | None = None, port: int | None = None) -> str:
        return (
            f"ssh://root@127.0.0.1:{port or self.port}{self.device_dir}"
            f"?python={sys.executable}&identity={key or self.key}&known_hosts={self.known_hosts}"
        )


def _keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    # `make test` installs openssh-server and openssh-client: missing, this is a failure, not a skip.
    assert SSHD.exists() and shutil.which("ssh") is not None, "needs openssh-server and openssh-client (`make test` installs them)"
    root = tmp_path_factory.mktemp("sshd")
    host_key, key, wrong_key = (_keygen(root / name) for name in ("host_key", "client_key", "wrong_key"))
    (root / "authorized_keys").write_text(key.with_suffix(".pub").read_text())
    port = free_port()
    config = root / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\n"
        f"AuthorizedKeysFile {root / 'authorized_keys'}\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
        # pytest's tmp directories are not the 0700 home directories sshd insists on otherwise.
        f"StrictModes no\nUsePAM no\nPidFile {root / 'sshd.pid'}\n"
    )
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation directory
    log = (root / "sshd.log").open("w")
    process = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, f"sshd (log {root / 'sshd.log'})", process, timeout_s=20)
        yield Sshd(port, key, wrong_key, root / "known_hosts", root / "device")
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ssh-artifacts")
    built = {}
    for target, backend in (("cpu", "tvm"), ("cpu", "onnx"), ("arm64", "onnx")):
        out = root / f"tiny-llama-{target}-{backend}"
        result = runner.invoke(app, ["compile", str(tiny_llama_dir), "--target", target, "--backend", backend, "-o", str(out)])
        assert result.exit_code == 0, result.output
        built[f"{target}-{backend}"] = out
    return built


@pytest.mark.parametrize("backend", ["tvm", "onnx"])
def test_deploy_passes_parity_over_ssh(sshd: Sshd, artifacts: dict[str, Path], backend: str) -> None:
    artifact = artifacts[f"cpu-{backend}"]
    result = runner.invoke(app, ["deploy", str(artifact), "--device", sshd.uri(), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["machine"] == platform.machine() and report["emulated"] is False and report["hashes_ok"] is True
    assert report["parity"]["ok"] is True
    device_dir = Path(report["device_path"])
    assert device_dir.parent == sshd.device_dir / "artifacts" and device_dir.name.startswith(artifact.name)
    uploaded = sorted(p.relative_to(device_dir) for p in device_dir.rglob("*") if p.is_file())
    assert uploaded == sorted(p.relative_to(artifact) for p in artifact.rglob("*") if p.is_file())
    assert (sshd.device_dir / "agent.py").is_file()
    # Nothing half-uploaded is left beside the artifact.
    assert not [p for p in (sshd.device_dir / "artifacts").iterdir() if p.name.startswith(".")]


def test_wrong_key_is_unreachable(sshd: Sshd, artifacts: dict[str, Path]) -> None:
    result = runner.invoke(app, ["deploy", str(artifacts["cpu-onnx"]), "--device", sshd.uri(key=sshd.wrong_key)])
    assert result.exit_code == 6 and "Permission denied" in result.output and "Traceback" not in result.output, result.output


def test_closed_port_is_unreachable(sshd: Sshd, artifacts: dict[str, Path]) -> None:
    result = runner.invoke(app, ["deploy", str(artifacts["cpu-onnx"]), "--device", sshd.uri(port=free_port())])
    assert result.exit_code == 6 and "refused" in result.output.lower() and "Traceback" not in result.output, result.output


def test_arm64_artifact_is_refused_before_upload(sshd: Sshd, artifacts: dict[str, Path]) -> None:
    artifact = artifacts["arm64-onnx"]
    result = runner.invoke(app, ["deploy", str(artifact), "--device", sshd.uri()])
    assert result.exit_code == 3 and "built for arm64 (aarch64)" in result.output, result.output
    uploads = sshd.device_dir / "artifacts"
    assert not uploads.exists() or not [p for p in uploads.iterdir() if p.name.startswith(artifact.name)]


def test_uploads_are_trimmed_to_the_cap_and_device_clean_removes_the_rest(
    sshd: Sshd, artifacts: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device used to keep every upload, interrupted ones included, until its disk filled."""
    uploads = sshd.device_dir / "artifacts"
    stale, live = uploads / ".killed.tmp-0000", uploads / ".uploading.tmp-1111"
    for path in (stale, live):
        path.mkdir(parents=True, exist_ok=True)
        (path / "weights.bin").write_bytes(b"\0" * 4096)
    two_hours_ago = os.stat(stale).st_mtime - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    monkeypatch.setenv("EDGEC_DEVICE_UPLOADS_MB", "0")
    try:
        paths = []
        for name in ("cpu-onnx", "cpu-tvm"):
            result = runner.invoke(app, ["deploy", str(artifacts[name]), "--device", sshd.uri(), "--json"])
            assert result.exit_code == 0, result.output
            paths.append(Path(json.loads(result.stdout)["device_path"]))
        assert not paths[0].exists() and paths[1].is_dir()
        assert not stale.exists() and live.is_dir()  # a deploy may still be writing that one
        clean = runner.invoke(app, ["device", "clean", sshd.uri(), "--json"])
        assert clean.exit_code == 0, clean.output
        report = json.loads(clean.stdout)
        assert [r["name"] for r in report["removed"]] == [paths[1].name] and report["kept"] == []
        assert not paths[1].exists() and (sshd.device_dir / "agent.py").is_file()
        monkeypatch.setenv("EDGEC_DEVICE_UPLOADS_MB", "lots")
        refused = runner.invoke(app, ["deploy", str(artifacts["cpu-onnx"]), "--device", sshd.uri()])
        assert refused.exit_code == 2 and "EDGEC_DEVICE_UPLOADS_MB='lots'" in refused.output, refused.output
        assert [p.name for p in uploads.iterdir()] == [live.name]
    finally:
        shutil.rmtree(live, ignore_errors=True)


def test_an_upload_that_outlasts_its_bound_is_given_up_on(sshd: Sshd, artifacts: dict[str, Path]) -> None:
    """The ssh upload used to have no bound at all: a stalled link hung deploy forever. No
    ssh session to a real sshd completes in 10 ms, so this upload outlasts its bound."""
    from edgec.errors import DeviceUnreachableError
    from edgec.targets.devices import parse_device

    device = parse_device(sshd.uri())
    started = time.monotonic()
    with pytest.raises(DeviceUnreachableError, match=r"did not finish within 0 s \(--timeout S\); nothing was run"):
        device.upload(artifacts["cpu-onnx"], "bounded", 0.01)
    assert time.monotonic() - started < 10
    uploads = sshd.device_dir / "artifacts"
    assert not (uploads / "bounded").exists()


def test_an_artifact_with_a_file_its_manifest_does_not_list_is_not_uploaded(sshd: Sshd, artifacts: dict[str, Path], tmp_path: Path) -> None:
    artifact = tmp_path / "extra"
    shutil.copytree(artifacts["cpu-onnx"], artifact)
    (artifact / "notes.txt").write_text("added after the compile")
    result = runner.invoke(app, ["deploy", str(artifact), "--device", sshd.uri()])
    assert result.exit_code == 4 and "(not in the manifest: notes.txt); nothing uploaded" in result.output, result.output


def test_ssh_options(monkeypatch: pytest.MonkeyPatch) -> None:
    device = SshDevice("ssh://pi@board/opt/e/", "pi", "board", 2222, "/opt/e/", "python3", "/k", known_hosts="/kh")
    argv = device.agent_command(["check", "/opt/e/artifacts/a b"])
    assert argv[-1] == "python3 /opt/e/agent.py check '/opt/e/artifacts/a b'"
    assert argv[-3:-1] == ["pi@board", "--"]
    assert {"BatchMode=yes", "UserKnownHostsFile=/kh"} <= set(argv) and ["-p", "2222"] == argv[1:3]
    assert argv[argv.index("-i") + 1] == "/k"
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(MissingDependencyError, match="openssh-client"):
        device.machine()
