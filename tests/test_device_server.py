"""`edgec device up|status|down` keep track of the whole server: the stock TVM RPC server
listens from a worker process it spawns, so the process edgec starts is not the listener."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgec.cli import app
from edgec.device_server import _listeners, _port_taken
from tests.conftest import free_port

runner = CliRunner()


def _status(port: int) -> list[dict]:
    result = runner.invoke(app, ["device", "status", "--json"])
    assert result.exit_code == 0, result.output
    return [s for s in json.loads(result.stdout) if s["port"] == port]


@pytest.mark.arm64
def test_two_ups_on_one_port_at_once_leave_one_server_and_a_clear_refusal() -> None:
    """Both used to pass the port check; the loser's server then sat in memory, unlisted."""
    port = free_port()
    command = [sys.executable, "-m", "edgec.cli", "device", "up", "qemu-arm64", "--port", str(port), "--json"]
    both = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.communicate(timeout=300), p.returncode) for p in both]
    try:
        assert sorted(code for _, code in results) == [0, 2], results
        (winner_out, _), _ = next(r for r in results if r[1] == 0)
        (_, loser_err), _ = next(r for r in results if r[1] == 2)
        assert f"on port {port}" in loser_err and "Traceback" not in loser_err
        winner = json.loads(winner_out)
        [server] = _status(port)
        assert server["pid"] == winner["pid"] and server["listening"] is True
        assert _listeners(port) and _listeners(port) <= set(server["pids"])
        assert not _status(port + 1) and not _listeners(port + 1)
    finally:
        runner.invoke(app, ["device", "down", "qemu-arm64", "--port", str(port)])
    assert not _listeners(port) and not _port_taken(port)


@pytest.mark.arm64
def test_a_server_whose_first_process_was_killed_is_still_listed_and_stopped() -> None:
    """The worker that listens outlives a killed parent: it used to vanish from `status`
    and `down` while still running uploaded code on the port."""
    port = free_port()
    up = runner.invoke(app, ["device", "up", "qemu-arm64", "--port", str(port), "--json"])
    assert up.exit_code == 0, up.output
    leader = json.loads(up.stdout)["pid"]
    try:
        os.kill(leader, signal.SIGKILL)
        time.sleep(1)
        [server] = _status(port)
        assert server["listening"] is True and leader not in server["pids"], server
    finally:
        down = runner.invoke(app, ["device", "down", "qemu-arm64", "--port", str(port)])
    assert down.exit_code == 0, down.output
    assert not _listeners(port) and not _port_taken(port) and not _status(port)


def test_a_state_file_naming_someone_elses_process_is_dropped_and_nothing_is_killed(tmp_path: Path) -> None:
    """A recycled pid (or an edited state file) must never get an unrelated program killed."""
    from edgec.cache import cache_root

    stranger = subprocess.Popen(["sleep", "120"], start_new_session=True)
    port = free_port()
    run = cache_root() / "devices" / "run"
    run.mkdir(parents=True, exist_ok=True)
    state = {"device": "qemu-arm64", "pid": stranger.pid, "host": "127.0.0.1", "port": port, "key": "k",
             "tracker": None, "log": str(tmp_path / "log"), "emulated": True, "rootfs": str(tmp_path / "rootfs"),
             "uri": f"rpc://127.0.0.1:{port}?key=k"}
    (run / f"qemu-arm64-{port}.json").write_text(json.dumps(state))
    try:
        assert not _status(port)
        down = runner.invoke(app, ["device", "down", "qemu-arm64", "--port", str(port)])
        assert down.exit_code == 2 and f"is not up on port {port}" in down.output
        assert stranger.poll() is None
        assert not (run / f"qemu-arm64-{port}.json").exists()
    finally:
        stranger.kill()
        stranger.wait()


def test_device_clean_empties_the_emulated_devices_uploads_newest_kept_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgec.targets.device_qemu import QemuDevice

    monkeypatch.setenv("EDGEC_CACHE_DIR", str(tmp_path))  # only this test's uploads
    uploads = QemuDevice().local_uploads
    uploads.mkdir(parents=True, exist_ok=True)
    for age, name in enumerate(("newest", "middle", "oldest")):
        (uploads / name).mkdir()
        (uploads / name / "weights.bin").write_bytes(b"\0" * 600_000)
        os.utime(uploads / name, (time.time() - 60 * age, time.time() - 60 * age))
    keep = runner.invoke(app, ["device", "clean", "qemu-arm64", "--keep-mb", "1", "--json"])
    assert keep.exit_code == 0, keep.output
    assert [r["name"] for r in json.loads(keep.stdout)["removed"]] == ["oldest", "middle"]
    assert sorted(p.name for p in uploads.iterdir()) == ["newest"]
    everything = runner.invoke(app, ["device", "clean", "qemu-arm64"])
    assert everything.exit_code == 0 and "removed 1 upload(s), 0.6 MB; 0 kept" in everything.output, everything.output
    assert not list(uploads.iterdir())
    rpc = runner.invoke(app, ["device", "clean", "rpc://127.0.0.1:9091"])
    assert rpc.exit_code == 2 and "nothing to clean" in rpc.output
