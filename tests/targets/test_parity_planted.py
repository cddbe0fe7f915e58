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

from edgec.artifact import hash_tree
from edgec.cli import app

runner = CliRunner()


def rehash(root: Path, rtol: float | None = None) -> None:
    """Make the manifest agree with edited files (as a miscompiled artifact would)."""
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"] = hash_tree(root)
    if rtol is not None:
        manifest["reference"]["tolerance"]["rtol"] = rtol
    (root / "manifest.json").write_text(json.dumps(manifest))


def plant_nan(artifact: Path, copy: Path) -> Path:
    """NaN in the last layer's k projection: its present_k goes non-finite."""
    shutil.copytree(artifact, copy)
    params = copy / "model" / "params.safetensors"
    tensors = load_file(str(params))
    manifest = json.loads((copy / "manifest.json").read_text())
    layers = manifest["lm"]["num_layers"]
    key = next(k for k in tensors if f"layers_{layers - 1}_self_attn_k_proj_weight" in k.replace(".", "_"))
    tensors[key] = tensors[key].copy()
    tensors[key][0, 0] = np.nan
    save_file(tensors, str(params))
    rehash(copy)
    return copy


def plant_flip(artifact: Path, copy: Path) -> Path:
    """Make the reference's second-best decode logit its best, by more than the tolerance,
    while moving no value by more than it (every other logit down by 0.9 x tolerance, that
    one up by as much): only the argmax rule can catch it."""
    shutil.copytree(artifact, copy)
    reference_path = copy / "reference.safetensors"
    reference = load_file(str(reference_path))
    logits = reference["decode.out.0"].astype(np.float64)
    rtol = 0.1  # the new margin (>= 1.8 - 0.5 tolerances) beats the new tolerance (<= 1.18)
    tolerance = rtol * float(logits.max() - logits.min())
    row = logits[0, -1]
    first, second = np.argsort(row)[::-1][:2]
    assert row[first] - row[second] < 0.5 * tolerance
    planted = row - 0.9 * tolerance
    planted[second] = row[second] + 0.9 * tolerance
    logits[0, -1] = planted
    reference["decode.out.0"] = logits.astype(np.float32)
    save_file(reference, str(reference_path))
    rehash(copy, rtol)
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
    parity = json.loads(nan.stdout)["checks"][1]
    assert nan.exit_code == 4 and parity["ok"] is False and "non-finite values in the artifact's output" in parity["detail"]
    flip = runner.invoke(app, ["verify", str(plant_flip(host_artifact, tmp_path / "flip")), "--json"])
    parity = json.loads(flip.stdout)["checks"][1]
    assert flip.exit_code == 4 and parity["detail"].startswith("decode.logits: argmax") and "> tolerance" in parity["detail"]


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
    assert flip.exit_code == 4 and report["reason"].startswith("decode.logits: argmax") and "> tolerance" in report["reason"]
