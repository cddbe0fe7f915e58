"""MODEL as a torch.export .pt2 or an .onnx file: both backends compile it with parity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from edgec.cli import app

pytestmark = pytest.mark.compile
runner = CliRunner()


class SmallNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(torch.relu(self.proj(x)), dim=-1)


@pytest.fixture(scope="module")
def graph_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("graphs")
    torch.manual_seed(0)
    net = SmallNet().eval()
    example = (torch.randn(4, 16),)
    shapes = ({0: torch.export.Dim.DYNAMIC},)
    program = torch.export.export(net, example, dynamic_shapes=shapes)
    torch.export.save(program, root / "net.pt2")
    torch.onnx.export(net, example, root / "net.onnx", dynamo=True, input_names=["x"], dynamic_shapes=shapes, verbose=False)
    return {"pt2": root / "net.pt2", "onnx": root / "net.onnx"}


@pytest.mark.parametrize("kind", ["pt2", "onnx"])
@pytest.mark.parametrize("backend", ["tvm", "onnx"])
def test_graph_input_compiles_with_parity(graph_files: dict[str, Path], kind: str, backend: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    trust = ["--trust-pickle"] if kind == "pt2" else []
    result = runner.invoke(app, ["compile", str(graph_files[kind]), *trust, "--backend", backend, "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    summary = json.loads(result.stdout)
    assert summary["parity"]["ok"] is True
    verify = runner.invoke(app, ["verify", str(out)])
    assert verify.exit_code == 0 and "parity   ok" in verify.output


def test_inspect_graph_and_refuse_passes_for_it(graph_files: dict[str, Path], tmp_path: Path) -> None:
    refused = runner.invoke(app, ["inspect", str(graph_files["pt2"])])
    assert refused.exit_code == 2 and "runs pickle" in refused.output and "--trust-pickle" in refused.output
    result = runner.invoke(app, ["inspect", str(graph_files["pt2"]), "--trust-pickle", "--json"])
    info = json.loads(result.stdout)
    assert info["family"] == "exported-program" and info["parameters"] == 16 * 8 + 8 and info["inputs"] == ["x"]
    refused = runner.invoke(
        app, ["compile", str(graph_files["pt2"]), "--trust-pickle", "--set", "passes=quantize-weights-int8", "-o", str(tmp_path / "o")]
    )
    assert refused.exit_code == 3 and "pass quantize-weights-int8 does not apply" in refused.output
    assert not (tmp_path / "o").exists()
