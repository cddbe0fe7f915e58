"""The family contract is the only place a family touches: a toy family defined in this
file (load, entries, program; a few lines) is compiled, verified, run and profiled on
this host (a stock TVM RPC server) and on the emulated aarch64 device, with no change
to edgec."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from edgec.cli import app
from edgec.families import FAMILIES, Family, register
from edgec.model import ModelHandle, sha256_files
from edgec.targets.export import ExportedEntry
from tests.conftest import host_rpc_server

runner = CliRunner()


def toy_module() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).eval()


class ToyFamily(Family):
    """A two-layer perceptron stored as toy.json + weights.safetensors."""

    name = "toy-mlp"

    def recognise(self, path: Path) -> bool:
        return (path / "toy.json").is_file()

    def load(self, path: Path, name: str | None, trust_pickle: bool) -> ModelHandle:
        module = toy_module()
        module.load_state_dict(load_file(str(path / "weights.safetensors")))
        files = [path / "toy.json", path / "weights.safetensors"]
        return ModelHandle(name or str(path), self.name, "ToyMLP", path, sha256_files(files), module=module)

    def entries(self, model: ModelHandle) -> list[ExportedEntry]:
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
        shapes = ({0: torch.export.Dim.DYNAMIC},)
        program = torch.export.export(model.module, (x,), dynamic_shapes=shapes)
        return [ExportedEntry("mlp", program, model.module, (x,), shapes, ["x"], ["y"])]


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    register(ToyFamily())
    path = tmp_path_factory.mktemp("toy") / "model"
    path.mkdir()
    torch.manual_seed(0)
    save_file(toy_module().state_dict(), str(path / "weights.safetensors"))
    (path / "toy.json").write_text("{}")
    yield path
    FAMILIES.pop(ToyFamily.name)


def cli_json(*args: str) -> dict[str, Any]:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def host_rpc() -> Iterator[str]:
    with host_rpc_server() as uri:
        yield uri


@pytest.mark.compile
def test_a_toy_family_compiles_verifies_runs_and_profiles_on_this_host(toy_dir: Path, tmp_path: Path, host_rpc: str) -> None:
    out = tmp_path / "toy-cpu"
    summary = cli_json("compile", str(toy_dir), "--target", "cpu", "-o", str(out))
    assert summary["parity"]["ok"] is True
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["family"] == "toy-mlp" and manifest["program"]["kind"] == "forward"
    assert [c["ok"] for c in cli_json("verify", str(out))["checks"]] == [True, True, True]
    inputs = tmp_path / "x.npz"
    x = np.linspace(-1, 1, 20, dtype=np.float32).reshape(5, 4)
    np.savez(inputs, x=x)
    ran = cli_json("run", str(out), "--inputs", str(inputs))
    with torch.no_grad():
        want = toy_module().requires_grad_(False)
        want.load_state_dict(load_file(str(toy_dir / "weights.safetensors")))
        y = want(torch.from_numpy(x)).numpy()
    summary_y = ran["entries"]["mlp"]["outputs"]["y"]
    assert summary_y["shape"] == [5, 3] and summary_y["max"] == pytest.approx(float(y.max()), abs=1e-5)
    profiled = cli_json("profile", str(out), "--device", host_rpc, "--runs", "3")
    assert profiled["entry"] == "mlp" and profiled["latency"]["runs"] == 3


@pytest.mark.arm64
@pytest.mark.parametrize("backend", ["tvm", "onnx"])
def test_a_toy_family_deploys_and_profiles_on_the_emulated_device(toy_dir: Path, tmp_path: Path, backend: str) -> None:
    out = tmp_path / f"toy-arm64-{backend}"
    cli_json("compile", str(toy_dir), "--target", "arm64", "--backend", backend, "-o", str(out))
    deployed = cli_json("deploy", str(out), "--device", "qemu-arm64")
    assert deployed["machine"] == "aarch64" and deployed["parity"]["ok"] is True
    assert [o["output"] for o in deployed["parity"]["outputs"]] == ["y"]
    profiled = cli_json("profile", str(out), "--device", "qemu-arm64", "--runs", "2")
    assert profiled["entry"] == "mlp" and profiled["emulated"] is True and profiled["per_op_ms"]
