"""--target cuda compiles here (TVM's CUDA codegen); running needs a GPU and libcuda,
which the build machines lack, so the test inspects the built library instead of loading it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgec.artifact import read_manifest
from edgec.cli import app
from tests.conftest import planted_exits_dir

pytestmark = pytest.mark.compile
runner = CliRunner()


@pytest.mark.parametrize("target,arch", [("cuda", "sm_80"), ("sm_90", "sm_90")])
def test_tvm_cuda_artifact_holds_a_cuda_module(tiny_llama_dir: Path, tmp_path: Path, target: str, arch: str) -> None:
    out = tmp_path / "gpu"
    result = runner.invoke(app, ["compile", str(tiny_llama_dir), "--target", target, "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    summary = json.loads(result.stdout)
    assert summary["parity"]["ok"] is None and "built for cuda" in summary["parity"]["reason"]
    assert f"arch={arch}" in summary["target_resolved"]
    library = (out / "model" / "prefill.so").read_bytes()
    # The packed module tree imports a "cuda" module carrying the kernels' source and function table.
    assert b"\x04\x00\x00\x00\x00\x00\x00\x00cuda" in library and b"__global__" in library
    assert library.count(b"_kernel") > 20
    manifest = read_manifest(out)
    assert manifest["target"]["tvm_target"]["kind"] == "cuda" and manifest["target"]["tvm_target"]["arch"] == arch
    verify = runner.invoke(app, ["verify", str(out), "--json"])
    checks = {c["name"]: c["ok"] for c in json.loads(verify.stdout)["checks"]}
    assert verify.exit_code == 0 and checks == {"manifest": True, "hashes": True, "parity": None}


def test_onnx_cuda_artifact_records_the_cuda_provider(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "gpu-onnx"
    result = runner.invoke(app, ["compile", str(tiny_llama_dir), "--target", "gpu", "--backend", "onnx", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert read_manifest(out)["backend_record"]["ort_provider"] == "CUDAExecutionProvider"


def test_float16_cuda_artifact_stores_half_weights(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    out = tmp_path / "gpu-fp16"
    result = runner.invoke(app, ["compile", str(tiny_llama_dir), "--target", "sm_90", "--set", "dtype=float16", "-o", str(out)])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert manifest["recipe"]["dtype"] == "float16" and manifest["backend_record"]["dtype"] == "float16"
    # Half precision alone moves logits by ~1e-3 of their range: the device check gets rtol 1e-2.
    assert manifest["reference"]["tolerance"]["rtol"] == 1e-2
    dtypes = {str(array.dtype) for array in load_file(str(out / "model" / "params.safetensors")).values()}
    assert "float16" in dtypes
    library = (out / "model" / "prefill.so").read_bytes()
    assert b"half" in library and b"__global__" in library


def test_float16_is_refused_where_the_capability_table_lacks_it(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cpu-fp16"
    result = runner.invoke(app, ["compile", str(tiny_llama_dir), "--target", "cpu", "--set", "dtype=float16", "-o", str(out)])
    assert result.exit_code == 3
    assert "float16" in result.output and "float32 only" in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_act_calibrated_attention_compiles_for_cuda(planted_sink_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "gpu-act"
    result = runner.invoke(app, ["compile", str(planted_sink_llama_dir), "--target", "cuda", "--recipe", "recipes/act.yaml",
                                 "--set", "act.heads={0: [0, 1, 2, 3]}", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    manifest = read_manifest(out)
    assert [c["input"] for c in manifest["lm"]["cache"]] == ["past_k", "past_v", "past_s"]
    assert manifest["lm"]["cache"][2]["layout"] == ["calibrated_heads", "batch", "tokens"]
    library = (out / "model" / "decode.so").read_bytes()
    assert b"__global__" in library


def test_a_voting_model_compiles_for_cuda(tmp_path: Path) -> None:
    out = tmp_path / "voting-gpu"
    result = runner.invoke(app, ["compile", str(planted_exits_dir(tmp_path)), "--target", "cuda", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    manifest = read_manifest(out)
    assert manifest["lm"]["voting"]["exits"] == [0, 1] and manifest["program"]["entries"]["prefill"]["outputs"][-1] == "exit_logits"
    assert b"__global__" in (out / "model" / "prefill.so").read_bytes()
