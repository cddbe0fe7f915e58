"""One parity rule everywhere: a NaN planted in an artifact's weights (it reaches the
cache outputs) and an argmax flip planted in its reference fail on this host (`verify`)
and on the emulated device (`deploy`, the agent) alike, naming the output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from edgec.artifact import hash_tree, manifest_digest
from edgec.cli import app

runner = CliRunner()


def rehash(root: Path, rtol: float | None = None) -> None:
    """Make the manifest agree with edited files (as a miscompiled artifact would)."""
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"] = hash_tree(root)
    if rtol is not None:
        manifest["reference"]["tolerance"]["rtol"] = manifest["recipe"]["parity"]["rtol"] = rtol
    manifest["digest"] = manifest_digest(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))


def plant_nan(artifact: Path, copy: Path) -> Path:
    """A NaN in every k and v projection (the weights the cache is computed from; TVM
    stores them transposed, or as [N / width, K, width] column panels, under lifted names,
    so they are found by shape)."""
    shutil.copytree(artifact, copy)
    params = copy / "model" / "params.safetensors"
    tensors = load_file(str(params))
    lm = json.loads((copy / "manifest.json").read_text())["lm"]
    kv_width = lm["num_kv_heads"] * lm["head_dim"]
    planted = 0
    for key, value in tensors.items():
        matrix = value.ndim == 2 and kv_width in value.shape and value.shape != (kv_width, kv_width)
        panels = value.ndim == 3 and value.shape[0] * value.shape[2] == kv_width and value.shape[1] != kv_width
        if matrix or panels:
            tensors[key] = value.copy()
            tensors[key][(0,) * value.ndim] = np.nan
            planted += 1
    assert planted >= 2 * lm["num_layers"]
    save_file(tensors, str(params))
    rehash(copy)
    return copy


def flipped(logits: np.ndarray, rtol: float) -> np.ndarray | None:
    """The logits with one position's top two swapped by moving each by 0.99 x the
    tolerance (so no value moves by more than it) if the swapped margin then exceeds the
    tolerance (a decisive flip), else None."""
    top2 = np.sort(logits[0], axis=-1)[:, -2:]
    position = int(np.argmin(top2[:, 1] - top2[:, 0]))
    first, second = np.argsort(logits[0, position])[::-1][:2]
    planted = logits.copy()
    for _ in range(20):  # the tolerance depends on the planted range: iterate to its fixed point
        tolerance = rtol * float(planted.max() - planted.min())
        planted = logits.copy()
        planted[0, position, second] += 0.99 * tolerance
        planted[0, position, first] -= 0.99 * tolerance
    tolerance = rtol * float(planted.max() - planted.min())
    top = np.sort(planted[0, position])[-2:]
    decisive = planted[0, position].argmax() == second and top[1] - top[0] > tolerance
    return planted if decisive and np.abs(planted - logits).max() <= tolerance else None


def plant_flip(artifact: Path, copy: Path) -> Path:
    """Flip the reference's argmax at one prompt position by more than the tolerance while
    moving no value by more than it: only the argmax rule can catch it. The manifest's
    rtol is raised until such a flip exists (a tiny random model's top two are far apart)."""
    shutil.copytree(artifact, copy)
    reference_path = copy / "reference.safetensors"
    reference = load_file(str(reference_path))
    logits = reference["prefill.out.0"].astype(np.float64)
    rtol, planted = next((r, f) for r in np.arange(0.05, 1.0, 0.05) if (f := flipped(logits, float(r))) is not None)
    reference["prefill.out.0"] = planted.astype(np.float32)
    save_file(reference, str(reference_path))
    rehash(copy, float(rtol))
    return copy


@pytest.fixture(scope="module")
def host_artifact(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("host") / "tiny-cpu"
    result = runner.invoke(app, ["compile", str(tiny_llama_dir), "--target", "cpu", "-o", str(out)])
    assert result.exit_code == 0, result.output + result.stderr
    return out


@pytest.mark.compile
def test_planted_nan_and_flip_fail_verify_on_this_host(host_artifact: Path, tmp_path: Path) -> None:
    nan = runner.invoke(app, ["verify", str(plant_nan(host_artifact, tmp_path / "nan")), "--json"])
    parity = next(c for c in json.loads(nan.stdout)["checks"] if c["name"] == "parity")
    assert nan.exit_code == 4 and parity["ok"] is False and "non-finite values in the artifact's output" in parity["detail"]
    assert parity["detail"].split(":")[0] in ("prefill.present_k", "prefill.present_v", "prefill.logits", "decode.present_k")
    flip = runner.invoke(app, ["verify", str(plant_flip(host_artifact, tmp_path / "flip")), "--json"])
    parity = next(c for c in json.loads(flip.stdout)["checks"] if c["name"] == "parity")
    assert flip.exit_code == 4 and parity["detail"].startswith("prefill.logits: argmax") and "> tolerance" in parity["detail"]


@pytest.mark.arm64
def test_planted_nan_and_flip_fail_on_the_emulated_device(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> None:
    root = tmp_path_factory.mktemp("arm64-planted")
    built = root / "tiny-arm64"
    result = runner.invoke(app, ["compile", str(tiny_llama_dir), "--target", "arm64", "-o", str(built)])
    assert result.exit_code == 0, result.output + result.stderr
    nan = runner.invoke(app, ["deploy", str(plant_nan(built, root / "nan")), "--device", "qemu-arm64", "--json"])
    report = json.loads(nan.stdout)["parity"]
    failing = {o["output"] for o in report["outputs"] if not o["ok"]}
    assert nan.exit_code == 4 and "present_k" in failing and report["ok"] is False
    flip = runner.invoke(app, ["deploy", str(plant_flip(built, root / "flip")), "--device", "qemu-arm64", "--json"])
    report = json.loads(flip.stdout)["parity"]
    assert flip.exit_code == 4 and report["reason"].startswith("prefill.logits: argmax") and "> tolerance" in report["reason"]


def plant_wrong_input(artifact: Path, copy: Path) -> Path:
    """Reference ids stored as float32: the built module refuses them when it runs."""
    shutil.copytree(artifact, copy)
    reference_path = copy / "reference.safetensors"
    reference = load_file(str(reference_path))
    reference["main.in.0"] = reference["main.in.0"].astype(np.float32)
    save_file(reference, str(reference_path))
    rehash(copy)
    return copy


@pytest.mark.arm64
def test_a_module_that_fails_to_run_is_a_failed_check_here_and_on_the_device(tmp_path: Path) -> None:
    """Not a traceback, not "device unreachable" (exit 6): exit 4 with the runtime's own words."""
    from tests.onnx_corpus import build

    (tmp_path / "corpus").mkdir()
    graph = build(tmp_path / "corpus")["text-mask-opset17"]
    for target in ("cpu", "arm64"):
        result = runner.invoke(app, ["compile", str(graph), "--target", target, "-o", str(tmp_path / target)])
        assert result.exit_code == 0, result.output + result.stderr
    host = runner.invoke(app, ["verify", str(plant_wrong_input(tmp_path / "cpu", tmp_path / "cpu-bad")), "--json"])
    parity = next(c for c in json.loads(host.stdout)["checks"] if c["name"] == "parity")
    assert host.exit_code == 4 and parity["detail"].startswith("main.*: the runtime failed on inputs input_ids [1, 16]")
    bad = plant_wrong_input(tmp_path / "arm64", tmp_path / "arm64-bad")
    deployed = runner.invoke(app, ["deploy", str(bad), "--device", "qemu-arm64", "--json"])
    report = json.loads(deployed.stdout)["parity"]
    assert deployed.exit_code == 4 and report["reason"].startswith("main.*: the runtime failed on inputs input_ids [1, 16]")
    # Outside parity (profile times the first entry on the reference inputs) the agent's own
    # failure is reported the same way, naming the command and the error it raised.
    profiled = runner.invoke(app, ["profile", str(bad), "--device", "qemu-arm64", "--runs", "1"])
    text = profiled.output + profiled.stderr
    assert profiled.exit_code == 4 and "`profile` failed on the device:" in text and "Traceback" not in text, text
