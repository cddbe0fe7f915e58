"""edgec compile end to end on a tiny Llama through both backends: artifact, manifest,
parity, verify (and tampering), packed int8 weights, and generation in the runtime."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from edgec.artifact import manifest_digest, open_runtime, read_manifest
from edgec.cli import app
from edgec.targets.runtime import Generation
from tests.conftest import make_tiny_llama

pytestmark = pytest.mark.compile
runner = CliRunner()
BACKENDS = ("tvm", "onnx")


def compile_json(*args: str) -> dict:
    result = runner.invoke(app, ["compile", *args, "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> dict[str, tuple[Path, dict]]:
    root = tmp_path_factory.mktemp("artifacts")
    built = {}
    for backend in BACKENDS:
        out = root / f"tiny-{backend}"
        built[backend] = (out, compile_json(str(tiny_llama_dir), "--target", "cpu", "--backend", backend, "-o", str(out)))
    return built


@pytest.mark.parametrize("backend", BACKENDS)
def test_summary_and_manifest_describe_the_artifact(artifacts: dict, backend: str) -> None:
    out, summary = artifacts[backend]
    assert summary["artifact"] == str(out) and summary["backend"] == backend and summary["target"] == "cpu"
    assert summary["parity"]["ok"] is True and summary["parity"]["max_abs_diff"] <= summary["parity"]["tolerance"]
    manifest = read_manifest(out)
    files = manifest["files"]
    assert summary["size_bytes"] == manifest["size_bytes"] == sum((out / f).stat().st_size for f in files)
    assert len(manifest["model"]["sha256"]) == 64 and manifest["recipe"]["backend"] == backend
    assert manifest["tools"]["torch"].startswith("2.13") and manifest["reference"]["tolerance"]["rtol"] == 1e-3
    assert set(manifest["reference"]["entries"]) == {"prefill", "decode"}
    assert manifest["lm"]["num_kv_heads"] == 2 and manifest["lm"]["max_context"] == 64
    expected = {"tvm": {"model/prefill.so", "model/decode.so", "model/params.safetensors"},
                "onnx": {"model/prefill.onnx", "model/decode.onnx", "model/weights.bin"}}[backend]
    assert expected <= set(files) and "reference.safetensors" in files
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("backend", BACKENDS)
def test_verify_passes_and_one_changed_byte_fails_it(artifacts: dict, backend: str, tmp_path: Path) -> None:
    out, _ = artifacts[backend]
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    ok = runner.invoke(app, ["verify", str(copy), "--json"])
    report = json.loads(ok.stdout)
    assert ok.exit_code == 0 and [c["ok"] for c in report["checks"]] == [True, True, True]
    weights = copy / ("model/params.safetensors" if backend == "tvm" else "model/weights.bin")
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    bad = runner.invoke(app, ["verify", str(copy)])
    assert bad.exit_code == 4 and "changed: " + str(weights.relative_to(copy)) in bad.output


def _reseal(manifest: dict) -> None:
    manifest["digest"] = manifest_digest(manifest)


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda m: m["target"].update(name="rpi5"), "manifest.json does not match its digest: it was edited after the compile"),
        (lambda m: (m["reference"]["tolerance"].update(rtol=1e9), _reseal(m)), "the parity tolerance rtol=1000000000.0 is not the one its recipe gives (0.001)"),
        (lambda m: (m["target"].update(arch="aarch64"), _reseal(m)), "model/decode.so is built for x86_64, but the manifest's target cpu is aarch64"),
    ],
    ids=["edited", "tolerance", "architecture"],
)
def test_a_tampered_manifest_fails_verify_and_is_not_run(artifacts: dict, tmp_path: Path, edit: Any, needle: str) -> None:
    out, _ = artifacts["tvm"]
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    verify = runner.invoke(app, ["verify", str(copy), "--json"])
    assert verify.exit_code == 4
    checks = {c["name"]: c for c in json.loads(verify.stdout)["checks"]}
    assert checks["manifest"]["ok"] is False and needle in checks["manifest"]["detail"]
    run = runner.invoke(app, ["run", str(copy), "--inputs", str(tmp_path / "unused.npz")])
    assert run.exit_code == 4 and needle in run.output and "Traceback" not in run.output


def test_run_refuses_a_changed_file_even_after_a_clean_run(artifacts: dict, tmp_path: Path) -> None:
    out, _ = artifacts["onnx"]
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    # The files hash clean (and are recorded so), then the tokenizer-less model is refused.
    clean = runner.invoke(app, ["run", str(copy), "--prompt", "x"])
    assert clean.exit_code == 2 and "carries no tokenizer" in clean.output
    weights = copy / "model" / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0x01
    weights.write_bytes(bytes(data))
    changed = runner.invoke(app, ["run", str(copy), "--prompt", "x"])
    assert changed.exit_code == 4 and "does not match its manifest (model/weights.bin)" in changed.output


def test_manifest_cannot_point_outside_the_artifact(artifacts: dict, tmp_path: Path) -> None:
    out, _ = artifacts["tvm"]
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["backend_record"]["entries"]["prefill"]["library"] = "../../elsewhere.so"
    manifest["digest"] = manifest_digest(manifest)  # even a manifest whose digest agrees
    (copy / "manifest.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["verify", str(copy)])
    assert result.exit_code == 2 and "not one of its hashed files" in result.output


@pytest.mark.parametrize("backend", BACKENDS)
def test_runtime_generation_equals_transformers(artifacts: dict, backend: str) -> None:
    out, _ = artifacts[backend]
    manifest = read_manifest(out)
    runtime = open_runtime(out, manifest)
    generation = Generation(manifest["program"])
    prompt = [7, 3, 99, 41, 5]

    def run(entry: str, args: list[Any]) -> list[Any]:
        return runtime.run(entry, args, native=True)

    ours = generation.greedy(run, prompt, 12)
    with torch.no_grad():
        theirs = make_tiny_llama().generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert ours == theirs[0, len(prompt):].tolist()
    # TVM on CPU reads an appended, position-major cache in place; ONNX Runtime the concatenated one.
    k_cache = manifest["program"]["cache"][0]
    assert k_cache["append"] is (backend == "tvm")
    assert k_cache["layout"] == (["tokens", "layers", "batch", "kv_heads", "head_dim"] if backend == "tvm"
                                 else ["layers", "batch", "kv_heads", "tokens", "head_dim"])
    # Batch 2 and a longer prompt run through the same entries (dynamic shapes).
    logits, k, _ = runtime.run("prefill", [np.array([prompt * 4, prompt[::-1] * 4], dtype=np.int64)])
    sizes = {"tokens": 20, "layers": 2, "batch": 2, "kv_heads": 2, "head_dim": 16}
    assert logits.shape == (2, 20, 128) and k.shape == tuple(sizes[axis] for axis in k_cache["layout"])
    # A one-token prompt is a valid prefill (torch.export's 0/1 specialisation must not leak in).
    one = generation.greedy(run, [9], 3)
    with torch.no_grad():
        assert one == make_tiny_llama().generate(torch.tensor([[9]]), max_new_tokens=3, min_new_tokens=3, do_sample=False)[0, 1:].tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_recipe_keeps_weights_packed(artifacts: dict, backend: str, tiny_llama_dir: Path, tmp_path: Path) -> None:
    fp32_out, _ = artifacts[backend]
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "int8-weights.yaml"
    out = tmp_path / "int8"
    summary = compile_json(str(tiny_llama_dir), "--recipe", str(recipe), "--backend", backend, "-o", str(out))
    assert summary["parity"]["ok"] is True and [p["name"] for p in summary["passes"]] == ["quantize-weights-int8"]
    weights = "model/params.safetensors" if backend == "tvm" else "model/weights.bin"
    fp32_bytes = (fp32_out / weights).stat().st_size
    int8_bytes = (out / weights).stat().st_size
    # int8 + one fp32 scale per row, tied table stored once: ~0.27x of fp32 here.
    assert int8_bytes < 0.35 * fp32_bytes, (int8_bytes, fp32_bytes)
