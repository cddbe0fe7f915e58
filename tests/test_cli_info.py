"""The reporting commands: data on stdout (JSON with --json), nothing else needed."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgec.cli import app

runner = CliRunner()


def json_of(*args: str) -> object:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_zoo_targets_passes_env() -> None:
    assert {row["name"] for row in json_of("zoo", "list")} == {"zoo:tiny-lm", "zoo:tiny-dit", "zoo:tiny-dit-diffcr", "zoo:gcn-wordnet", "zoo:smollm2-135m", "zoo:gemma3-270m", "zoo:minilm-l6"}
    targets = {row["name"]: row for row in json_of("targets", "list")}
    assert {"cpu", "x86_64", "arm64"} <= set(targets) and "aarch64" in targets["arm64"]["aliases"]
    assert targets["arm64"]["tvm_target"]["mtriple"] == "aarch64-linux-gnu"
    passes = {row["name"]: row for row in json_of("passes")}
    assert passes["quantize-weights-int8"]["options"]["group_size"]["default"] == 0
    env = json_of("env")
    assert env["versions"]["apache-tvm"] == "0.27.0.post1" and env["versions"]["onnxruntime"] == "1.32.0"


def test_cache_list_and_clean(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEC_CACHE_DIR", str(tmp_path))
    (tmp_path / "models" / "x").mkdir(parents=True)
    (tmp_path / "models" / "x" / "w.bin").write_bytes(b"1234")
    listed = json_of("cache", "list")
    assert listed["cache_dir"] == str(tmp_path) and listed["entries"][0]["size_bytes"] == 4
    assert runner.invoke(app, ["cache", "clean"]).exit_code == 0
    assert json_of("cache", "list")["entries"] == []


def test_inspect_hf_directory(tiny_llama_dir: Path) -> None:
    info = json_of("inspect", str(tiny_llama_dir))
    assert info["family"] == "causal-lm" and info["architecture"] == "LlamaForCausalLM"
    assert info["layers"] == 2 and info["kv_heads"] == 2 and info["dtypes"] == ["float32"]
    assert info["parameters"] == 128 * 64 + 2 * (64 * 64 * 2 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64) + 64


def test_help_documents_exit_codes() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "Exit codes" in result.output and "parity" in result.output


def test_version_is_the_package_version() -> None:
    from edgec import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"edgec {__version__}"


def test_env_names_llvm_the_compilers_the_emulator_and_the_cpu() -> None:
    import platform
    import shutil

    result = runner.invoke(app, ["env", "--json"])
    assert result.exit_code == 0, result.output
    env = json.loads(result.stdout)
    assert int(env["tools"]["llvm (tvm)"]) >= 15
    assert ("qemu-aarch64 version" in env["tools"]["qemu-aarch64"]) == (shutil.which("qemu-aarch64-static") is not None)
    expected = {"x86_64": "sse2", "aarch64": "asimd"}.get(platform.machine())
    assert expected is None or expected in env["cpu"]["flags"]
