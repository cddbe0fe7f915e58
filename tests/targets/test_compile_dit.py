"""zoo:tiny-dit (a diffusers DiT trained on Fashion-MNIST) through both backends: the
sampler program's parity against diffusers' own scheduler, `run --class` drawing items
the classifier recognises, the guided sample check able to fail, bad model directories
refused before work, and the arm64 build sampling on the emulated device."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from edgec.artifact import load_reference, open_runtime, read_manifest
from edgec.cli import app
from edgec.families.dit import draw, open_sampler
from edgec.recipe import Recipe
from edgec.targets.runtime import check_parity
from edgec.zoo import ZOO_DIR

runner = CliRunner()
BACKENDS = ("tvm", "onnx")


def cli_json(*args: str) -> dict[str, Any]:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-dit")
    built = {}
    for backend in BACKENDS:
        built[backend] = root / backend
        cli_json("compile", "zoo:tiny-dit", "--backend", backend, "-o", str(built[backend]))
    return built


@pytest.mark.compile
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_sampler_reproduces_diffusers_samples_and_draws_the_asked_class(artifacts: dict[str, Path], backend: str,
                                                                            tmp_path: Path) -> None:
    out = artifacts[backend]
    manifest = read_manifest(out)
    program = manifest["program"]
    assert program["kind"] == "sample" and program["scheduler"]["kind"] == "ddim" and program["steps"] == 20
    assert manifest["dit"]["tokens"] == 256 and manifest["dit"]["labels"][3] == "Dress"
    parity = manifest["parity"]
    sampled = [o for o in parity["outputs"] if o["entry"] == "sample"]
    # The whole 20-step guided sample, drawn by diffusers' DDIMScheduler in torch, within 1e-3 of the image range.
    assert parity["ok"] is True and len(sampled) == 1 and sampled[0]["ok"] and sampled[0]["max_abs_diff"] <= sampled[0]["tolerance"]
    assert sampled[0]["tolerance"] == pytest.approx(1e-3 * np.ptp(load_reference(out)["sample.out.0"]))

    grid = tmp_path / "grid.png"
    ran = cli_json("run", str(out), "--class", "Dress", "--samples", "8", "--seed", "0", "-o", str(grid))
    assert ran["class"] == 3 and ran["steps"] == 20 and grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ran["classified_as_asked"] >= 0.75, ran  # recognisable items of the asked class, by the classifier

    # Guidance is part of what is checked: the same artifact with another scale fails the sample check.
    runtime = open_runtime(out, manifest)
    wrong = check_parity(runtime, {**program, "guidance_scale": 1.0}, load_reference(out), manifest["parity"]["rtol"])
    assert wrong["ok"] is False and wrong["reason"].startswith("sample.image: max |diff|")


@pytest.mark.compile
def test_fid_of_the_artifact_equals_that_of_the_model_and_beats_noise(artifacts: dict[str, Path]) -> None:
    ours = cli_json("eval", str(artifacts["onnx"]), "--task", "fid", "--samples", "20")
    theirs = cli_json("eval", "zoo:tiny-dit", "--task", "fid", "--samples", "20")
    assert ours["fid"] == pytest.approx(theirs["fid"], rel=1e-3) and ours["class_accuracy"] == theirs["class_accuracy"]
    assert ours["class_accuracy"] >= 0.6 and ours["fid"] < 4 * ours["fid_real_floor"] + 10, ours


def _copy(tmp_path: Path) -> Path:
    copy = tmp_path / "dit"
    shutil.copytree(ZOO_DIR / "tiny-dit", copy)
    return copy


def _edit(path: Path, **changes: Any) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_bad_model_directories_are_refused_before_work(tmp_path: Path) -> None:
    model = _copy(tmp_path)
    _edit(model / "scheduler" / "scheduler_config.json", _class_name="LCMScheduler")
    unknown = runner.invoke(app, ["compile", str(model), "-o", str(tmp_path / "a")])
    assert unknown.exit_code == 3 and "scheduler LCMScheduler is not supported" in unknown.output
    _edit(model / "scheduler" / "scheduler_config.json", _class_name="DDPMScheduler")
    _edit(model / "transformer" / "config.json", sample_size=33)
    odd = runner.invoke(app, ["compile", str(model), "-o", str(tmp_path / "b")])
    assert odd.exit_code == 2 and "sample_size 33 is not a multiple of patch_size 2" in odd.output
    _edit(model / "transformer" / "config.json", sample_size=32)
    (model / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    missing = runner.invoke(app, ["compile", str(model), "-o", str(tmp_path / "c")])
    assert missing.exit_code == 2 and "safetensors only" in missing.output
    assert not any(p.name.startswith(("a", "b", "c")) for p in tmp_path.iterdir() if p.name != "dit")


@pytest.mark.compile
def test_run_refuses_a_class_the_model_does_not_have(artifacts: dict[str, Path]) -> None:
    bad = runner.invoke(app, ["run", str(artifacts["onnx"]), "--class", "Hat"])
    assert bad.exit_code == 2 and "--class Hat: not a class of this model" in bad.output and "Ankle boot" in bad.output
    assert "Traceback" not in bad.output


@pytest.mark.arm64
def test_the_diffcr_arm64_build_samples_on_the_emulated_device_like_the_host(tmp_path: Path) -> None:
    out = tmp_path / "dit-arm64"
    # The DiffCR-tuned zoo model: one region graph per timestep region, routed blocks included.
    # 8 sampler steps: the whole-sample parity on the emulated device in 40% of the time of 20.
    cli_json("compile", "zoo:tiny-dit-diffcr", "--recipe", "recipes/diffcr.yaml", "--target", "arm64", "--set", "sampler.steps=8",
             "-o", str(out))
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["program"]["regions"]) == 4 and min(map(min, manifest["dit"]["mod"]["capacities"])) < 256
    deployed = cli_json("deploy", str(out), "--device", "qemu-arm64")
    assert deployed["machine"] == "aarch64" and deployed["parity"]["ok"] is True
    sampled = [o for o in deployed["parity"]["outputs"] if o["entry"] == "sample"]
    assert len(sampled) == 1 and sampled[0]["ok"] and sampled[0]["max_abs_diff"] <= sampled[0]["tolerance"]

    # `run --device`: the grid drawn on the device, image for image the torch model's (its learned
    # token skipping) from the same seeds.
    grid, saved = tmp_path / "device.png", tmp_path / "device.npz"
    ran = cli_json("run", str(out), "--device", "qemu-arm64", "--class", "Trouser", "--samples", "2", "--seed", "5",
                   "-o", str(grid), "--npz", str(saved))
    assert ran["steps"] == 8  # the artifact's own step count
    assert ran["machine"] == "aarch64" and ran["emulated"] is True and grid.read_bytes()[:4] == b"\x89PNG"
    run_torch, program, _, described = open_sampler("zoo:tiny-dit-diffcr")
    assert "mod learned" in described
    want = draw(run_torch, program, [1, 1], 5, 8, 2.0)
    got = np.load(saved)["images"]
    assert got.shape == want.shape == (2, 1, 32, 32)
    assert np.abs(got - want).max() <= 1e-3 * np.ptp(want), np.abs(got - want).max()
    every_token, program, _, _ = open_sampler("zoo:tiny-dit-diffcr", Recipe())  # the same weights, no skipping
    assert np.abs(draw(every_token, program, [1, 1], 5, 8, 2.0) - got).max() > 100 * np.abs(got - want).max()
