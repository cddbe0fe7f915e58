"""rpc:// and tracker:// against stock TVM servers: `edgec device up qemu-arm64` runs
`python3 -m tvm.exec.rpc_server` inside the emulated aarch64 user space, and the
tracker is TVM's own `python -m tvm.exec.rpc_tracker`, both on loopback."""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgec.cli import app
from tests.conftest import dense_perplexity, free_port, wait_for_port

pytestmark = pytest.mark.arm64
runner = CliRunner()
DIRECT_KEY = "edgec-test-direct"
POOL_KEY = "edgec-test-pool"


def _compile(model: Path | str, out: Path, *args: str) -> Path:
    result = runner.invoke(app, ["compile", str(model), "-o", str(out), *args])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def artifacts(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rpc")
    return {
        "arm64": _compile(tiny_llama_dir, root / "arm64-tvm", "--target", "arm64"),
        "arm64-onnx": _compile(tiny_llama_dir, root / "arm64-onnx", "--target", "arm64", "--backend", "onnx"),
        "host": _compile(tiny_llama_dir, root / "host-tvm", "--target", "cpu"),
    }


@pytest.fixture(scope="module")
def devices() -> Iterator[dict[str, int]]:
    """One device served directly, and two behind a stock tracker (same key)."""
    tracker_port = free_port()
    tracker = subprocess.Popen(
        [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(tracker_port), "--port-end", str(tracker_port + 1)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    ports = {"direct": free_port(), "pool-a": free_port(), "pool-b": free_port(), "tracker": tracker_port}
    started = []
    try:
        wait_for_port(tracker_port, "the stock tracker", tracker)
        for name, key, extra in (
            ("direct", DIRECT_KEY, []),
            ("pool-a", POOL_KEY, ["--tracker", f"127.0.0.1:{tracker_port}"]),
            ("pool-b", POOL_KEY, ["--tracker", f"127.0.0.1:{tracker_port}"]),
        ):
            result = runner.invoke(app, ["device", "up", "qemu-arm64", "--port", str(ports[name]), "--key", key, *extra, "--json"])
            assert result.exit_code == 0, result.output
            started.append(ports[name])
        time.sleep(2)  # servers register with the tracker after they listen
        yield ports
    finally:
        for port in started:
            runner.invoke(app, ["device", "down", "qemu-arm64", "--port", str(port)])
        os.killpg(tracker.pid, signal.SIGTERM)  # the tracker serves from a child process
        tracker.wait(timeout=30)


def _uri(ports: dict[str, int], key: str = DIRECT_KEY) -> str:
    return f"rpc://127.0.0.1:{ports['direct']}?key={key}&timeout=300"


def test_device_status_lists_listening_servers(devices: dict[str, int]) -> None:
    result = runner.invoke(app, ["device", "status", "--json"])
    assert result.exit_code == 0
    servers = {s["port"]: s for s in json.loads(result.stdout)}
    for name in ("direct", "pool-a", "pool-b"):
        state = servers[devices[name]]
        assert state["listening"] is True and state["host"] == "127.0.0.1" and state["emulated"] is True
    assert servers[devices["direct"]]["uri"] == f"rpc://127.0.0.1:{devices['direct']}?key={DIRECT_KEY}"


def test_cache_clean_never_removes_a_running_device(devices: dict[str, int]) -> None:
    """`cache clean` once removed the emulated user space and the pid files under a running
    server, which then kept listening, invisible to `device status` and `down`."""
    from edgec.cache import cache_root

    rootfs = [p for p in (cache_root() / "devices").iterdir() if p.name.startswith("qemu-arm64-")]
    result = runner.invoke(app, ["cache", "clean", "--kind", "devices"])
    assert result.exit_code == 0 and "kept devices: a device edgec started is running" in result.output
    assert rootfs and all(p.is_dir() for p in rootfs)
    status = json.loads(runner.invoke(app, ["device", "status", "--json"]).stdout)
    assert {devices[name] for name in ("direct", "pool-a", "pool-b")} <= {s["port"] for s in status}


def test_rpc_deploy_passes_parity_on_a_stock_server(devices: dict[str, int], artifacts: dict[str, Path]) -> None:
    result = runner.invoke(app, ["deploy", str(artifacts["arm64"]), "--device", _uri(devices), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["parity"]["ok"] is True and report["parity"]["max_abs_diff"] <= report["parity"]["tolerance"]
    assert report["emulated"] is True and "read back from the device" in report["hash_check"]
    assert "versions" in report["unavailable"]


def test_a_finished_deploy_frees_the_server_for_the_next_session(devices: dict[str, int], artifacts: dict[str, Path]) -> None:
    """A stock server serves one session at a time. TVM's VM.get_outputs made a reference
    cycle that kept the deploy's session open until the garbage collector ran, and the next
    client waited up to the session timeout (300 s here; CI saw 180 s handshake failures)."""
    from tvm import rpc

    gc.disable()  # the cycle collector would hide a leaked session
    try:
        result = runner.invoke(app, ["deploy", str(artifacts["arm64"]), "--device", _uri(devices), "--json"])
        assert result.exit_code == 0, result.output
        began = time.perf_counter()
        session = rpc.connect("127.0.0.1", devices["direct"], key=DIRECT_KEY, session_timeout=60)
        waited = time.perf_counter() - began
        del session
    finally:
        gc.enable()
    # The emulated server takes seconds to end a session; a leaked one holds it for 300 s.
    assert waited < 150, f"the next session waited {waited:.0f} s: the deploy's session was left open"


def test_rpc_profile_gives_time_evaluator_figures_and_names_the_missing_ones(
    devices: dict[str, int], artifacts: dict[str, Path], tmp_path: Path
) -> None:
    saved = tmp_path / "rpc.json"
    args = ["profile", str(artifacts["arm64"]), "--device", _uri(devices), "--runs", "4", "--new-tokens", "3", "--out", str(saved)]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["latency"]["runs"] == 4 and 0 < report["latency"]["p50_ms"] <= report["latency"]["p99_ms"]
    assert report["decode"]["runs"] == 3 and report["decode_tokens_per_s"] > 0
    assert set(report["unavailable"]) == {"per_op_ms", "peak_rss_bytes", "versions"}
    assert json.loads(saved.read_text())["complete"] is True
    text = runner.invoke(app, args)
    assert text.exit_code == 0 and "not available per_op_ms" in text.output and "emulated" in text.output
    agent_result = {"latency": {"p50_ms": 2 * report["latency"]["p50_ms"]}, "load_ms": 5000.0}  # as qemu-arm64 writes it
    (tmp_path / "agent.json").write_text(json.dumps(agent_result))
    compared = runner.invoke(app, [*args, "--compare", str(tmp_path / "agent.json"), "--json"])
    assert compared.exit_code == 0, compared.output
    assert set(json.loads(compared.stdout)["compare"]) == {"latency p50_ms (new/old)"}  # no load ratio: not like with like
    plot = runner.invoke(app, [*args, "--plot", str(tmp_path / "ops.png")])
    assert plot.exit_code == 3 and "gives no per-op times" in plot.output and not (tmp_path / "ops.png").exists()


def test_tracker_spreads_profiling_over_both_devices(devices: dict[str, int], artifacts: dict[str, Path]) -> None:
    uri = f"tracker://127.0.0.1:{devices['tracker']}?key={POOL_KEY}&timeout=300"
    result = runner.invoke(app, ["profile", str(artifacts["arm64"]), "--device", uri, "--runs", "6", "--new-tokens", "0", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    served = report["devices"]
    assert len(served) == 2 and len({s["server"] for s in served}) == 2, served
    assert [s["runs"] for s in served] == [3, 3] and report["latency"]["runs"] == 6
    assert report["emulated"] is True
    deploy = runner.invoke(app, ["deploy", str(artifacts["arm64"]), "--device", uri, "--json"])
    assert deploy.exit_code == 0, deploy.output
    assert len(json.loads(deploy.stdout)["servers"]) == 2


def test_rpc_bad_inputs_exit_with_the_device_code(devices: dict[str, int], artifacts: dict[str, Path]) -> None:
    wrong_key = runner.invoke(app, ["deploy", str(artifacts["arm64"]), "--device", _uri(devices, key="not-the-key")])
    assert wrong_key.exit_code == 6 and "wrong key" in wrong_key.output and "Traceback" not in wrong_key.output
    refused = runner.invoke(app, ["deploy", str(artifacts["arm64"]), "--device", f"rpc://127.0.0.1:{free_port()}?key=k"])
    assert refused.exit_code == 6 and "connection refused" in refused.output
    no_pool = runner.invoke(app, ["profile", str(artifacts["arm64"]), "--device", f"tracker://127.0.0.1:{devices['tracker']}?key=nobody"])
    assert no_pool.exit_code == 6 and "no free server with key 'nobody'" in no_pool.output
    onnx = runner.invoke(app, ["deploy", str(artifacts["arm64-onnx"]), "--device", _uri(devices)])
    assert onnx.exit_code == 3 and "TVM libraries only" in onnx.output
    host = runner.invoke(app, ["deploy", str(artifacts["host"]), "--device", _uri(devices)])
    assert host.exit_code == 3 and "(x86_64) but" in host.output and "is aarch64" in host.output


@pytest.mark.parametrize("scheme", ["rpc", "tracker"])
def test_a_listener_that_never_answers_is_given_up_on_after_connect_timeout(artifacts: dict[str, Path], scheme: str) -> None:
    """A peer that accepts the connection and then says nothing used to hang deploy forever."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        uri = f"{scheme}://127.0.0.1:{silent.getsockname()[1]}?key=k&connect_timeout=2"
        started = time.monotonic()
        result = runner.invoke(app, ["deploy", str(artifacts["arm64"]), "--device", uri])
        waited = time.monotonic() - started
    assert result.exit_code == 6, result.output
    assert "accepted the connection but did not" in result.output and "no answer within 2 s" in result.output
    assert "connect_timeout=S" in result.output and "Traceback" not in result.output
    assert waited < 60, f"deploy waited {waited:.0f} s on a silent peer"


def test_device_up_refuses_other_addresses_and_busy_ports(devices: dict[str, int]) -> None:
    remote = runner.invoke(app, ["device", "up", "qemu-arm64", "--host", "0.0.0.0", "--port", str(free_port())])
    assert remote.exit_code == 2 and "--allow-remote" in remote.output and "no password" in remote.output
    busy = runner.invoke(app, ["device", "up", "qemu-arm64", "--port", str(devices["direct"])])
    assert busy.exit_code == 2 and "already up" in busy.output
    down = runner.invoke(app, ["device", "down", "qemu-arm64", "--port", str(free_port())])
    assert down.exit_code == 2 and "is not up" in down.output


def test_rpc_eval_scores_on_the_device_like_the_agent(devices: dict[str, int], tmp_path: Path) -> None:
    """A stock server returns the logits and the host scores them; the qemu-arm64 agent
    scores on the device. Same artifact, same windows: the same perplexity."""
    artifact = _compile("zoo:tiny-lm", tmp_path / "tiny-lm-arm64", "--target", "arm64")
    scores = {}
    for device in (_uri(devices), "qemu-arm64"):
        result = runner.invoke(app, ["eval", str(artifact), "--device", device, "--tokens", "150", "--window", "64", "--json"])
        assert result.exit_code == 0, result.output
        scores[device] = json.loads(result.stdout)
        assert scores[device]["device"] == device and scores[device]["parity"]["ok"] is True
    rpc, agent = scores.values()
    # The dense fp32 artifact scores what torch does on the same windows.
    assert rpc["tokens"] == agent["tokens"] == 150
    assert rpc["perplexity"] == pytest.approx(dense_perplexity(150, 64), rel=1e-3)
    assert abs(rpc["nll_per_token"] - agent["nll_per_token"]) < 1e-6
    refused = runner.invoke(app, ["eval", str(artifact), "--device", "qemu-arm64", "--task", "wordnet"])
    assert refused.exit_code == 2 and "--task ppl only" in refused.output


def test_kernels_are_never_timed_on_the_emulated_device(devices: dict[str, int], tiny_llama_dir: Path, tmp_path: Path) -> None:
    tracker = f"tracker://127.0.0.1:{devices['tracker']}?key={POOL_KEY}"
    for uri in (_uri(devices), tracker):
        args = ["compile", str(tiny_llama_dir), "--target", "arm64", "--set", "passes=schedule", "--set", f"schedule.device={uri}"]
        result = runner.invoke(app, [*args, "-o", str(tmp_path / "x")])
        assert result.exit_code == 2 and "emulated arm64 device" in result.output and "not ARM" in result.output, result.output
        assert "load " not in result.output and not (tmp_path / "x").exists()
