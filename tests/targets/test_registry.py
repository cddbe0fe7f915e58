"""Targets as data: aliases resolve to full descriptions, overrides apply, and
unsupported requests are refused before work with the nearest alternative."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgec.cli import app
from edgec.errors import BadInputError, MissingDependencyError, UnsupportedError
from edgec.targets.registry import host_mcpu, resolve_target

runner = CliRunner()


@pytest.mark.parametrize(
    "request_name,name,arch,field,value",
    [
        ("cpu", "cpu", None, "mcpu", None),
        ("aarch64", "arm64", "aarch64", "mtriple", "aarch64-linux-gnu"),
        ("raspberry-pi-4", "rpi4", "aarch64", "mcpu", "cortex-a72"),
        ("rpi5", "rpi5", "aarch64", "mcpu", "cortex-a76"),
        ("x86-64", "x86_64", "x86_64", "mcpu", "x86-64-v3"),
        ("gpu", "cuda", "cuda", "arch", "sm_80"),
        ("sm_90", "cuda-sm90", "cuda", "arch", "sm_90"),
    ],
)
def test_aliases_resolve_to_full_descriptions(request_name: str, name: str, arch: str | None, field: str, value: str | None) -> None:
    resolved = resolve_target(request_name, "tvm")
    assert resolved.name == name and resolved.how.startswith("target")
    if arch is not None:
        assert resolved.spec.arch == arch
    expected = host_mcpu() if value is None else value
    assert resolved.tvm_target[field] == expected
    assert "native" not in json.dumps(resolved.tvm_target)


def test_target_options_override_and_cuda_host_is_filled() -> None:
    resolved = resolve_target("arm64", "tvm", {"mcpu": "cortex-a55"})
    assert resolved.tvm_target["mcpu"] == "cortex-a55" and "mcpu=cortex-a55" in resolved.how
    assert resolve_target("cuda", "tvm").tvm_target["host"]["mcpu"] == host_mcpu()


def test_refusals_name_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(BadInputError, match="did you mean 'rpi5'"):
        resolve_target("rpi6", "tvm")
    monkeypatch.delenv("ANDROID_NDK_HOME", raising=False)
    with pytest.raises(MissingDependencyError, match="ANDROID_NDK_HOME"):
        resolve_target("android", "tvm")
    monkeypatch.setenv("ANDROID_NDK_HOME", "/nonexistent/ndk")
    with pytest.raises(MissingDependencyError, match="aarch64-linux-android24-clang"):
        resolve_target("android-arm64", "tvm")
    with pytest.raises(UnsupportedError, match="kind 'llvm' only"):
        resolve_target('{"kind": "opencl"}', "tvm")


def test_targets_show_and_target_opt_on_the_cli(tiny_llama_dir: Path) -> None:
    shown = json.loads(runner.invoke(app, ["targets", "show", "rpi4", "--json"]).stdout)
    assert shown["arch"] == "aarch64" and shown["cross_compiler"] == "aarch64-linux-gnu-g++"
    dry = runner.invoke(app, ["compile", str(tiny_llama_dir), "--target", "rpi4", "--target-opt", "mcpu=cortex-a53", "--dry-run"])
    assert dry.exit_code == 0 and "mcpu: cortex-a53" in dry.stdout
    bad = runner.invoke(app, ["compile", str(tiny_llama_dir), "--target-opt", "mcpu"])
    assert bad.exit_code == 2 and "expected key=value" in bad.output


@pytest.mark.compile
def test_rpi5_build_is_an_aarch64_library(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "rpi5"
    result = runner.invoke(app, ["compile", str(tiny_llama_dir), "--target", "rpi5", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    header = (out / "model" / "prefill.so").read_bytes()[:20]
    assert int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64
