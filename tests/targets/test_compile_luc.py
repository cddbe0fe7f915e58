"""luc artifacts end to end on zoo:tiny-lm: packed weights stay packed through TVM (bytes,
no fp32 weight anywhere in the built module, resident memory) and become MatMulNBits in
ONNX; parity against the compressed torch model; weight widths a target cannot lower."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from edgec.artifact import read_manifest
from edgec.cli import app
from tests.conftest import dense_perplexity

pytestmark = pytest.mark.compile
runner = CliRunner()
RECIPE = """
target: cpu
calibration: {samples: 6, seq_len: 64}
evaluate: {tokens: 512, window: 128}
passes:
  - name: luc
    options: {bits: 4, sparsity: 0.3, bit_choices: [4], group_size: 16, embedding_bits: 4, probe_samples: 2, validation_samples: 2}
  - name: schedule
    options: {trials: 2, prefill_rows: 16}
"""
# tiny-lm: 6 layers of hidden 256 / MLP 688, vocab 4096 (tied), 5.4M parameters.
HIDDEN, MLP, VOCAB = 256, 688, 4096


def compile_json(recipe: Path, out: Path, *args: str) -> dict:
    result = runner.invoke(app, ["compile", "zoo:tiny-lm", "--recipe", str(recipe), "-o", str(out), "--json", *args])
    assert result.exit_code == 0, result.output + result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[Path, dict]]]:
    root = tmp_path_factory.mktemp("luc")
    recipe = root / "luc.yaml"
    recipe.write_text(RECIPE)
    with pytest.MonkeyPatch.context() as patch:
        # A cache of its own: the first build must find an empty tuning database.
        patch.setenv("EDGEC_CACHE_DIR", str(root / "cache"))
        artifacts = {"tvm": (root / "tvm", compile_json(recipe, root / "tvm", "--backend", "tvm"))}
        # Groups of 32: the MLP's 688 inputs end in a ragged group of 16. (TVM's ragged groups:
        # tests/targets/test_compile_voting.py on cpu and test_deploy_qemu.py on arm64.)
        ragged = ["--set", "luc.group_size=32"]
        artifacts["onnx"] = (root / "onnx", compile_json(recipe, root / "onnx", "--backend", "onnx", *ragged))
        artifacts["tvm-again"] = (root / "again", compile_json(recipe, root / "again", "--backend", "tvm"))
        two_of_four = ["--set", "luc.pattern=2:4", "--set", "luc.sparsity=0.5"]
        artifacts["tvm-2:4"] = (root / "two-of-four", compile_json(recipe, root / "two-of-four", *two_of_four))
        offset = ["--set", "luc.offset=true", "--set", "luc.symmetric=false", "--set", "luc.sparsity=0", "--set", "schedule.trials=0"]
        for backend in ("tvm", "onnx"):
            out = root / f"{backend}-offset"
            artifacts[f"{backend}-offset"] = (out, compile_json(recipe, out, "--backend", backend, *offset))
        yield artifacts


def _weight_shapes() -> set[tuple[int, int]]:
    kv = 4 * 32
    pairs = {(HIDDEN, HIDDEN), (kv, HIDDEN), (MLP, HIDDEN), (HIDDEN, MLP), (VOCAB, HIDDEN)}
    return pairs | {(k, n) for n, k in pairs}


@pytest.mark.parametrize("backend", ["tvm", "onnx"])
def test_summary_has_policy_size_perplexity_and_parity(built: dict, backend: str) -> None:
    out, summary = built[backend]
    assert summary["parity"]["ok"] is True  # against the compressed torch model
    record = summary["passes"][0]["record"]
    assert [row["bits"] for row in record["layers"]] == [4] * 6
    assert record["achieved"]["sparsity"] == pytest.approx(0.3, abs=0.01)
    assert all(set(row["sensitivity"]["bits"]) == {"2", "3", "4", "8"} for row in record["layers"])
    evaluation = summary["evaluation"]
    dense = dense_perplexity(512, evaluation["window"])
    # 4 bits and 30% sparsity cost a little: more than nothing, far less than a broken model.
    assert evaluation["tokens"] > 400 and dense < evaluation["perplexity"] < 2 * dense, (evaluation, dense)
    assert read_manifest(out)["evaluation"] == evaluation


def test_tvm_keeps_weights_packed_in_params_kernels_and_memory(built: dict) -> None:
    out, summary = built["tvm"]
    params = out / "model" / "params.safetensors"
    fp32_bytes = summary["passes"][0]["record"]["weight_bytes_before"]
    with safe_open(str(params), "np") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    stored = sum(t.nbytes for t in tensors.values())
    assert stored <= 0.2 * fp32_bytes
    weight_shapes = _weight_shapes()
    assert not [k for k, t in tensors.items() if t.dtype.kind == "f" and tuple(t.shape) in weight_shapes]
    # Nothing between or inside the kernels is an fp32 matrix of a weight's shape.
    created = read_manifest(out)["backend_record"]["float_tensor_shapes"]
    assert not [s for shapes in created.values() for s in shapes if tuple(s) in weight_shapes]
    # Loading the artifact costs about the packed bytes in resident memory, not fp32 ones.
    probe = (
        "import resource, sys; from edgec.artifact import open_runtime, read_manifest; p = sys.argv[1];"
        "m = read_manifest(__import__('pathlib').Path(p)); import tvm;"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
        "r = open_runtime(__import__('pathlib').Path(p), m);"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)"
    )
    grown = int(subprocess.run([sys.executable, "-c", probe, str(out)], capture_output=True, text=True, check=True).stdout.split()[-1])
    assert grown < 0.4 * fp32_bytes, (grown, fp32_bytes)


def test_two_of_four_is_stored_compressed_and_decoded_inside_the_kernels(built: dict) -> None:
    out, summary = built["tvm-2:4"]
    assert summary["parity"]["ok"] is True
    record = summary["passes"][0]["record"]
    assert all(row["compressed_linears"] == 7 and row["measured_sparsity"] == 0.5 for row in record["layers"])
    storage = record["sparsity_storage"]
    # 4-bit codes: half of them kept, plus a 2-bit position each = 3 bits a weight.
    assert storage["bytes_saved"] == storage["code_bytes"] // 4 == storage["code_bytes"] - storage["code_bytes_if_sparse_stored"]
    with safe_open(str(out / "model" / "params.safetensors"), "np") as handle:
        stored = sum(handle.get_tensor(key).nbytes for key in handle.keys())
    dense_codes, _ = built["tvm"]
    with safe_open(str(dense_codes / "model" / "params.safetensors"), "np") as handle:
        assert stored == sum(handle.get_tensor(key).nbytes for key in handle.keys()) - storage["bytes_saved"]
    backend = read_manifest(out)["backend_record"]
    created = backend["float_tensor_shapes"]
    assert not [s for shapes in created.values() for s in shapes if tuple(s) in _weight_shapes()]
    # Per entry and workload, both kernels were timed and the faster one was built.
    for entry, rows in (("prefill", 16), ("decode", 1)):
        choices = backend["nm_kernels"][entry]
        assert len(choices) == 4 and all(c["rows"] == rows and c["source"] == "measured" for c in choices)
        assert all(c["us"]["decode"] > 0 and c["us"]["sparse"] > 0 for c in choices)
        sparse_built = backend["schedules"][entry].get("sparse-matmul", 0)
        assert (sparse_built > 0) == any(c["kernel"] == "sparse" for c in choices)


def test_onnx_runs_four_bit_linears_as_matmulnbits(built: dict) -> None:
    import onnx

    out, _ = built["onnx"]
    manifest = read_manifest(out)
    assert manifest["backend_record"]["packed_weights"] == {"4": "4-bit: MatMulNBits (packed in the file and in memory)"}
    graph = onnx.load(str(out / "model" / "prefill.onnx"), load_external_data=False).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("MatMulNBits") == 6 * 7 + 1  # every linear and the tied lm_head
    assert ops.count("MatMul") == 2 * 6  # only attention's q.k and p.v are float matmuls
    assert (out / "model" / "weights.bin").stat().st_size <= 0.2 * manifest["passes"][0]["record"]["weight_bytes_before"]


@pytest.mark.parametrize("backend", ["tvm", "onnx"])
def test_the_offset_grid_keeps_float16_offsets_through_both_backends_with_parity(built: dict, backend: str) -> None:
    import onnx

    out, summary = built[f"{backend}-offset"]
    assert summary["parity"]["ok"] is True  # the kernels decode code x scale + offset as torch does
    record = summary["passes"][0]["record"]
    assert record["offset"] is True and all(row["offset_grid_linears"] == 7 for row in record["layers"])
    # Per group of 16: 8 bytes of codes, a float16 scale and a float16 offset.
    packed = sum(row["bytes"] for row in record["layers"])
    assert packed == sum(row["parameters"] for row in record["layers"]) // 16 * (8 + 2 + 2)
    if backend == "tvm":
        with safe_open(str(out / "model" / "params.safetensors"), "np") as handle:
            dtypes = [str(handle.get_tensor(key).dtype) for key in handle.keys()]
        assert dtypes.count("float16") == 2 * dtypes.count("uint8")  # a scale and an offset per packed matrix
    else:
        graph = onnx.load(str(out / "model" / "decode.onnx"), load_external_data=False).graph
        nbits = [node for node in graph.node if node.op_type == "MatMulNBits"]
        assert len(nbits) == 6 * 7 + 1 and all(len(node.input) == 3 for node in nbits)  # no zero points: offsets apart
        float16 = {init.name for init in graph.initializer if init.data_type == onnx.TensorProto.FLOAT16}
        assert len(float16) == 2 * (6 * 7 + 1)


def test_schedule_measures_once_and_the_second_compile_reuses_the_database(built: dict) -> None:
    first = read_manifest(built["tvm"][0])["backend_record"]["tuning"]
    again = read_manifest(built["tvm-again"][0])["backend_record"]["tuning"]
    for entry in ("prefill", "decode"):
        assert first[entry]["tuned"] and first[entry]["measured_now"] > 0
        assert first[entry]["rows"] == {"prefill": 16, "decode": 1}[entry]
        kernels = first[entry]["kernels"]
        assert kernels and all(k["source"] == "measured" and k["candidates_measured"] == 2 for k in kernels)
        assert all(k["choice"]["us"] > 0 and k["template_us"] > 0 for k in kernels)
        assert any("uint8" in k["shapes"] for k in kernels)  # the packed layers are among the workloads
        assert again[entry]["measured_now"] == 0
        assert [k["choice"] for k in again[entry]["kernels"]] == [k["choice"] for k in kernels]
        assert all(k["source"] == "database" for k in again[entry]["kernels"])
    database = json.loads(Path(first["prefill"]["database"]).read_text())
    schedules = [r for key, r in database["records"].items() if not key.startswith("nm-kernel")]
    assert schedules and all(len(r["candidates"]) == 2 and all(c["us"] > 0 for c in r["candidates"]) for r in schedules)
    # The manifest's choice per workload is the measured best the database kept (written
    # and read back by the second compile), with the same tile settings.
    for entry in ("prefill", "decode"):
        for kernel in first[entry]["kernels"]:
            record = database["records"][f"{kernel['workload']}@{first[entry]['rows']}"]
            assert kernel["choice"] == {k: record["best"][k] for k in ("tile_rows", "tile_vectors", "panel", "us")}


def test_widths_a_target_cannot_lower_are_refused_before_loading(tmp_path: Path) -> None:
    recipe = tmp_path / "luc.yaml"
    recipe.write_text(RECIPE)
    result = runner.invoke(app, ["compile", "zoo:tiny-lm", "--recipe", str(recipe), "--target", "cuda", "-o", str(tmp_path / "x")])
    text = result.output + result.stderr
    assert result.exit_code == 3
    assert "4-bit weights cannot be lowered on cuda/tvm" in text and "nearest supported is 8 bits" in text
    assert "load zoo:tiny-lm" not in text and not (tmp_path / "x").exists()
    eight = ["--set", "luc.bit_choices=[8]", "--set", "luc.bits=8", "--set", "luc.embedding_bits=8"]
    result = runner.invoke(app, ["compile", "zoo:tiny-lm", "--recipe", str(recipe), "--target", "cuda", *eight, "-o", str(tmp_path / "x")])
    assert result.exit_code == 3 and "needs packed_lowbit_matmul, which cuda/tvm does not lower yet" in result.output + result.stderr


def test_calibration_shorter_than_asked_says_how_much_is_needed(tmp_path: Path) -> None:
    recipe = tmp_path / "luc.yaml"
    recipe.write_text(RECIPE)
    text = tmp_path / "short.txt"
    text.write_text("only a few words here")
    result = runner.invoke(
        app, ["compile", "zoo:tiny-lm", "--recipe", str(recipe), "--set", f"calibration.data={text}", "-o", str(tmp_path / "y")]
    )
    assert result.exit_code == 2 and "6 samples x 64 tokens need 384" in result.output + result.stderr
    assert not (tmp_path / "y").exists()


def test_report_writes_the_policy_plot_and_page_and_leaves_the_artifact_verified(built: dict, tmp_path: Path) -> None:
    out, _ = built["tvm"]
    result = runner.invoke(app, ["report", str(out), "--out", str(tmp_path / "report"), "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    assert json.loads(result.stdout)["files"] == ["policy.png", "report.html"]
    assert (tmp_path / "report" / "policy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "report" / "report.html").read_text()
    assert page.count("<tr><td>") >= 6 + 7 and "held-out perplexity" in page and "chosen µs" in page
    assert runner.invoke(app, ["verify", str(out)]).exit_code == 0
    inside = runner.invoke(app, ["report", str(out), "--out", str(out / "report")])
    assert inside.exit_code == 2 and "outside the artifact" in inside.output + inside.stderr
