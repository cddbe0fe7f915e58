"""An artifact records the instruction-set features its code may use, and refuses to
load where one is missing, naming it, instead of dying on an illegal instruction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgec.artifact import manifest_digest
from edgec.cli import app
from edgec.targets.agent import cpu_flags, missing_features
from edgec.targets.registry import resolve_target

runner = CliRunner()


def test_features_follow_the_target() -> None:
    portable = resolve_target("x86_64", "tvm").isa_features()
    assert {"avx2", "fma"} <= set(portable) and "avx512f" not in portable
    assert resolve_target("arm64", "tvm").isa_features() == ["asimd", "fp"]
    assert {"asimddp", "asimdhp"} <= set(resolve_target("rpi5", "tvm").isa_features())
    assert "asimddp" not in resolve_target("rpi4", "tvm").isa_features()
    assert resolve_target("cuda", "tvm").isa_features() == ["sm_80"]
    # ONNX Runtime picks kernels at run time from the CPU it finds: nothing to require.
    assert resolve_target("arm64", "onnx").isa_features() == []


def test_cpuinfo_flags_are_read_on_both_architectures(tmp_path: Path) -> None:
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu sse4_2 avx2 fma\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp\n")
    assert cpu_flags(x86) == {"fpu", "sse4_2", "avx2", "fma"}
    assert cpu_flags(arm) == {"fp", "asimd", "asimddp"}
    assert cpu_flags(tmp_path / "missing") == set()


def test_missing_features_are_named() -> None:
    have = sorted(cpu_flags())
    assert missing_features({"arch": "x86_64", "isa_features": have}) == []
    assert missing_features({"arch": "x86_64", "isa_features": [*have, "sve2"]}) == ["sve2"]


@pytest.mark.compile
def test_loading_an_artifact_that_needs_a_missing_feature_fails_by_name(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "art"
    result = runner.invoke(app, ["compile", str(tiny_llama_dir), "--target", "cpu", "-o", str(out)])
    assert result.exit_code == 0, result.output
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert "avx2" in manifest["target"]["isa_features"]
    manifest["target"]["isa_features"].append("amx_fp16_from_the_future")
    manifest["digest"] = manifest_digest(manifest)  # as if built so on a newer machine
    manifest_path.write_text(json.dumps(manifest))
    verify = runner.invoke(app, ["verify", str(out)])
    assert verify.exit_code == 3
    assert "amx_fp16_from_the_future" in verify.output and "Traceback" not in verify.output
    assert "--target x86_64" in verify.output
