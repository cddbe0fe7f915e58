"""The schedule pass timing kernels on a TVM RPC device (`schedule.device`): a stock
`python -m tvm.exec.rpc_server` on loopback stands in for a board of the host's
architecture. Each candidate is built here, uploaded and timed there; the measurements
go into a database of that device, which a second compile reuses."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgec.artifact import read_manifest
from edgec.cli import app
from tests.conftest import free_port, host_rpc_server

pytestmark = pytest.mark.compile
runner = CliRunner()
KEY = "edgec-test-host"
RECIPE = "target: cpu\npasses:\n  - name: schedule\n    options: {trials: 2, prefill_rows: 8}\n"


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with host_rpc_server(KEY) as uri:
        yield uri


def _compile(model: Path, out: Path, *args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["compile", str(model), "-o", str(out), *args])
    return result.exit_code, result.output + result.stderr


def test_kernels_are_timed_on_the_rpc_device_once(
    server: str, tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEC_CACHE_DIR", str(tmp_path / "cache"))
    recipe = tmp_path / "schedule.yaml"
    recipe.write_text(RECIPE)
    args = ["--recipe", str(recipe), "--set", f"schedule.device={server}", "--json"]
    code, output = _compile(tiny_llama_dir, tmp_path / "first", *args)
    assert code == 0, output
    first = read_manifest(tmp_path / "first")["backend_record"]["tuning"]
    for entry in ("prefill", "decode"):
        assert first[entry]["tuned"] and first[entry]["measured_on"] == server and first[entry]["measured_now"] > 0
        kernels = first[entry]["kernels"]
        assert kernels and all(k["source"] == "measured" and k["choice"]["us"] > 0 for k in kernels)
    database = json.loads(Path(first["prefill"]["database"]).read_text())
    assert database["device"] == f"rpc:{KEY}"
    assert all(c["us"] > 0 for r in database["records"].values() for c in r["candidates"])
    code, output = _compile(tiny_llama_dir, tmp_path / "again", *args)
    assert code == 0, output
    again = read_manifest(tmp_path / "again")["backend_record"]["tuning"]
    assert all(again[entry]["measured_now"] == 0 for entry in ("prefill", "decode"))
    assert [k["choice"] for k in again["decode"]["kernels"]] == [k["choice"] for k in first["decode"]["kernels"]]


def test_devices_that_cannot_time_kernels_are_refused_before_work(server: str, tiny_llama_dir: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "schedule.yaml"
    recipe.write_text(RECIPE)
    cases = [
        (["--set", "schedule.device=qemu-arm64"], 2, "timed over TVM RPC"),
        (["--set", f"schedule.device={server}", "--target", "arm64"], 2, "is x86_64 (arch= in the URI"),
        (["--set", f"schedule.device=rpc://127.0.0.1:{free_port()}?arch=x86_64"], 6, "connection refused"),
    ]
    for extra, code, message in cases:
        found, output = _compile(tiny_llama_dir, tmp_path / "x", "--recipe", str(recipe), *extra)
        assert found == code and message in output, output
        assert "load " not in output and "Traceback" not in output and not (tmp_path / "x").exists()
