"""The real-world ONNX corpus (tests/onnx_corpus.py) through both backends: each graph
compiles and verifies with parity against ONNX Runtime on realistic inputs, or is refused
with exit 3 naming the node and why; and what compiles for arm64 passes parity on the
emulated device. No traceback anywhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgec.cli import app
from tests.onnx_corpus import build

pytestmark = pytest.mark.compile
runner = CliRunner()

# With their symbolic sizes fixed, the shape computations fold and TVM imports them.
FPN_FIXED = ("--dim", "batch=1", "--dim", "height=64", "--dim", "width=64")
RESHAPE_FIXED = ("--dim", "batch=1", "--dim", "tokens=8")
# (graph, backend, extra arguments, None or what the refusal names)
CASES = [
    ("resnet-bn-opset11", "tvm", (), None),
    ("resnet-bn-opset11", "onnx", (), None),
    ("fpn-resize-opset11", "tvm", (), "at node /Resize_1 (Resize)"),
    ("fpn-resize-opset11", "tvm", FPN_FIXED, None),
    ("fpn-resize-opset11", "onnx", (), None),
    ("reshape-shape-opset13", "tvm", (), "at node /Reshape (Reshape): TypeError: Reshape requires the input new shape"),
    ("reshape-shape-opset13", "tvm", RESHAPE_FIXED, None),
    ("reshape-shape-opset13", "onnx", (), None),
    ("text-mask-opset17", "tvm", (), None),
    ("text-mask-opset17", "onnx", (), None),
    ("gru-opset13", "tvm", (), "no lowering for GRU"),
    ("gru-opset13", "onnx", (), None),
    ("cnn-dynamo-opset18", "tvm", (), None),
    ("cnn-dynamo-opset18", "onnx", (), None),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build(tmp_path_factory.mktemp("corpus"))


def _label(case: tuple) -> str:
    name, backend, extra, refused = case
    return f"{name}-{backend}" + ("-fixed" if extra else "")


@pytest.mark.parametrize("case", CASES, ids=[_label(c) for c in CASES])
def test_corpus_graph_compiles_with_parity_or_is_refused_naming_why(corpus: dict[str, Path], case: tuple, tmp_path: Path) -> None:
    name, backend, extra, refused = case
    out = tmp_path / "out"
    result = runner.invoke(app, ["compile", str(corpus[name]), "--backend", backend, "-o", str(out), "--json", *extra])
    text = result.output + result.stderr
    assert "Traceback" not in text
    payload = json.loads(result.stdout)
    if refused is not None:
        assert result.exit_code == 3 and payload["kind"] == "unsupported", text
        assert refused in payload["error"] and "--backend onnx runs it" in payload["error"], payload
        assert not out.exists()
        return
    assert result.exit_code == 0, text
    assert payload["parity"]["ok"] is True
    verify = runner.invoke(app, ["verify", str(out), "--json"])
    checks = {c["name"]: c["ok"] for c in json.loads(verify.stdout)["checks"]}
    assert verify.exit_code == 0 and checks["parity"] is True, verify.output


DEVICE_CASES = [c for c in CASES if c[3] is None]


@pytest.mark.arm64
@pytest.mark.parametrize("case", DEVICE_CASES, ids=[_label(c) for c in DEVICE_CASES])
def test_corpus_graph_passes_parity_on_the_emulated_device(corpus: dict[str, Path], case: tuple, tmp_path: Path) -> None:
    name, backend, extra, _ = case
    out = tmp_path / "out"
    result = runner.invoke(app, ["compile", str(corpus[name]), "--target", "arm64", "--backend", backend, "-o", str(out), *extra])
    assert result.exit_code == 0, result.output + result.stderr
    deployed = runner.invoke(app, ["deploy", str(out), "--device", "qemu-arm64", "--json"])
    assert deployed.exit_code == 0, deployed.output + deployed.stderr
    report = json.loads(deployed.stdout)
    assert report["machine"] == "aarch64" and report["parity"]["ok"] is True, report["parity"]
    # Symbolic sizes left in the artifact are checked there at both sizes.
    cases = {o["entry"] for o in report["parity"]["outputs"]}
    assert cases == ({"main"} if extra else {"main", "main@2"}), cases
