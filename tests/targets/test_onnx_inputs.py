""".onnx models as other frameworks export them: ONNX Runtime is the reference, inputs look
like what the graph is fed, symbolic dimensions are fixed from the command line or a recipe
(or checked at two sizes), real inputs can be given, and weights in Constant nodes count."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from edgec.artifact import load_reference, read_manifest
from edgec.cli import app
from tests.onnx_corpus import VOCAB, TextClassifier

pytestmark = pytest.mark.compile
runner = CliRunner()


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("onnx-inputs")
    torch.manual_seed(0)
    text = TextClassifier().eval()
    torch.onnx.export(text, (torch.randint(0, VOCAB, (2, 7)), torch.ones(2, 7, dtype=torch.long)), root / "text.onnx",
                      dynamo=False, opset_version=17, input_names=["input_ids", "attention_mask"], output_names=["logits"],
                      dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}})
    # BatchNormalization with `momentum` (as other frameworks export it), kept as a node.
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, momentum=0.1), torch.nn.ReLU()).eval()
    conv[1].running_mean.uniform_(-0.5, 0.5)
    conv[1].running_var.uniform_(0.5, 2.0)
    torch.onnx.export(conv, (torch.randn(1, 3, 16, 16),), root / "bn.onnx", dynamo=False, opset_version=11,
                      do_constant_folding=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch", 2: "height", 3: "width"}})
    return {"text": root / "text.onnx", "bn": root / "bn.onnx"}


def compile_json(model: Path, out: Path, *args: str) -> dict:
    result = runner.invoke(app, ["compile", str(model), "-o", str(out), "--json", *args])
    assert result.exit_code == 0, result.output + result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("backend", ["tvm", "onnx"])
def test_batchnorm_with_momentum_passes_against_onnx_runtime(graphs: dict[str, Path], backend: str, tmp_path: Path) -> None:
    from onnx.reference import ReferenceEvaluator

    bn = onnx.load(str(graphs["bn"]))
    assert any(a.name == "momentum" for n in bn.graph.node if n.op_type == "BatchNormalization" for a in n.attribute)
    summary = compile_json(graphs["bn"], tmp_path / "out", "--backend", backend)
    manifest = read_manifest(tmp_path / "out")
    assert manifest["reference"]["implementation"] == "onnxruntime CPUExecutionProvider"
    assert summary["parity"]["ok"] is True
    # Image-like: 224 x 224 at batch 1, then the symbolic sizes again at 160 x 160, batch 2.
    reference = load_reference(tmp_path / "out")
    assert reference["main.in.0"].shape == (1, 3, 224, 224) and reference["main@2.in.0"].shape == (2, 3, 160, 160)
    assert [o["entry"] for o in manifest["parity"]["outputs"]] == ["main", "main@2"]
    # The evaluator edgec used before (batch statistics where `momentum` is set) is off by far
    # more than the tolerance: with it as the reference this artifact would have been refused.
    spec = ReferenceEvaluator(str(graphs["bn"])).run(None, {"x": reference["main.in.0"]})[0]
    assert np.abs(spec - reference["main.out.0"]).max() > 10 * summary["parity"]["tolerance"]


def test_made_up_inputs_index_the_embedding_and_unmask_everything(graphs: dict[str, Path], tmp_path: Path) -> None:
    compile_json(graphs["text"], tmp_path / "out", "--backend", "onnx")
    reference = load_reference(tmp_path / "out")
    ids, mask = reference["main.in.0"], reference["main.in.1"]
    assert ids.shape == mask.shape == (1, 16) and ids.dtype == np.int64
    assert 0 <= ids.min() and ids.max() < VOCAB and len(set(ids.ravel().tolist())) > 4
    assert (mask == 1).all()
    assert reference["main@2.in.0"].shape == reference["main@2.in.1"].shape == (2, 11)


def test_symbolic_dimensions_are_fixed_from_the_command_line_and_a_recipe(graphs: dict[str, Path], tmp_path: Path) -> None:
    compile_json(graphs["text"], tmp_path / "cli", "--backend", "tvm", "--dim", "batch=1")
    program = read_manifest(tmp_path / "cli")["program"]["entries"]["main"]
    assert program["input_shapes"] == {"input_ids": [1, None], "attention_mask": [1, None]}
    reference = load_reference(tmp_path / "cli")
    assert reference["main.in.0"].shape == (1, 16) and reference["main@2.in.0"].shape == (1, 11)  # seq at two sizes

    recipe = tmp_path / "fixed.yaml"
    recipe.write_text("inputs:\n  dims: {batch: 1}\n  shapes: {input_ids: [1, 12]}\n")
    compile_json(graphs["text"], tmp_path / "recipe", "--backend", "tvm", "--recipe", str(recipe))
    manifest = read_manifest(tmp_path / "recipe")
    # input_ids' shape names seq, so attention_mask's seq is 12 too; nothing is left to vary.
    assert manifest["program"]["entries"]["main"]["input_shapes"] == {"input_ids": [1, 12], "attention_mask": [1, 12]}
    assert set(load_reference(tmp_path / "recipe")) == {"main.in.0", "main.in.1", "main.out.0"}


def test_reference_inputs_from_a_file_are_the_ones_checked(graphs: dict[str, Path], tmp_path: Path) -> None:
    ids = np.array([[5, 17, 42, 99, 3]], dtype=np.int64)
    mask = np.array([[1, 1, 1, 0, 0]], dtype=np.int64)  # padding: the masked tokens must not count
    np.savez(tmp_path / "real.npz", input_ids=ids, attention_mask=mask)
    compile_json(graphs["text"], tmp_path / "out", "--backend", "tvm", "--reference-inputs", str(tmp_path / "real.npz"))
    reference = load_reference(tmp_path / "out")
    assert (reference["main.in.0"] == ids).all() and (reference["main.in.1"] == mask).all()
    import onnxruntime as ort

    session = ort.InferenceSession(str(graphs["text"]), providers=["CPUExecutionProvider"])
    (want,) = session.run(None, {"input_ids": ids, "attention_mask": mask})
    np.testing.assert_array_equal(reference["main.out.0"], want)
    info = read_manifest(tmp_path / "out")["model"]["info"]
    assert info["reference_inputs"] == f"--reference-inputs {tmp_path / 'real.npz'}"


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--input-shape", "ids=1x8"], ["'ids', which is not an input", "input_ids, attention_mask"]),
        (["--input-shape", "input_ids=1x8x2"], ["has 3 dimensions", "input_ids has 2 (batchxseq)"]),
        (["--input-shape", "input_ids=1xten"], ["sizes integers >= 1"]),
        (["--dim", "sequence=8"], ["no symbolic dimension of that name", "batch, seq"]),
        (["--dim", "batch=2", "--input-shape", "input_ids=1x8"], ["makes dimension batch 1", "makes it 2"]),
        (["--reference-inputs", "missing.npz"], ["missing.npz does not exist"]),
    ],
)
def test_bad_shapes_and_inputs_are_refused_naming_them(graphs: dict[str, Path], tmp_path: Path, args: list[str],
                                                        needles: list[str]) -> None:
    result = runner.invoke(app, ["compile", str(graphs["text"]), "-o", str(tmp_path / "out"), *args])
    text = result.output + result.stderr
    assert result.exit_code == 2 and "Traceback" not in text, text
    for needle in needles:
        assert needle in text, (needle, text)
    assert not (tmp_path / "out").exists()


def test_inputs_are_refused_for_a_model_whose_family_makes_its_own(tmp_path: Path) -> None:
    result = runner.invoke(app, ["compile", "zoo:tiny-lm", "--dim", "batch=1", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "apply to .onnx models" in result.stderr, result.output + result.stderr


def test_weights_in_constant_nodes_are_parameters(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((8, 4)).astype(np.float32)
    bias = rng.standard_normal((4,)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(weight, "w")),
        helper.make_node("Constant", [], ["b"], value=numpy_helper.from_array(bias, "b")),
        helper.make_node("MatMul", ["x", "w"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "constants", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "constants.onnx")
    inspected = runner.invoke(app, ["inspect", str(tmp_path / "constants.onnx"), "--json"])
    assert json.loads(inspected.stdout)["parameters"] == 8 * 4 + 4
    compile_json(tmp_path / "constants.onnx", tmp_path / "out", "--backend", "tvm")
    from safetensors.numpy import load_file

    stored = load_file(str(tmp_path / "out" / "model" / "params.safetensors"))
    assert any(v.shape == (8, 4) and np.array_equal(v, weight) for v in stored.values()), {k: v.shape for k, v in stored.items()}


def test_a_failure_with_json_is_one_json_object_on_stdout(graphs: dict[str, Path], tmp_path: Path) -> None:
    result = runner.invoke(app, ["compile", str(tmp_path / "nothing.onnx"), "--json"])
    payload = json.loads(result.stdout)
    assert result.exit_code == 2 and payload == {**payload, "exit_code": 2, "kind": "bad-input"} and set(payload) == {"error", "exit_code", "kind"}
    assert "nothing.onnx does not exist" in payload["error"]
    unsupported = runner.invoke(app, ["compile", str(graphs["text"]), "--target", "arm64", "--set", "dtype=float16", "--json"])
    assert unsupported.exit_code == 3 and json.loads(unsupported.stdout)["kind"] == "unsupported"
