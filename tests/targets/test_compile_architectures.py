"""Every supported decoder architecture, as a tiny random checkpoint on disk, compiles
through both backends; parity covers prefill, one decode step and a 32-token greedy
generation in the artifact's runtime against torch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgec.cli import app
from tests.core.test_architectures import CONFIGS, make_model

pytestmark = pytest.mark.compile
runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("architectures")
    saved = {}
    for architecture in CONFIGS:
        saved[architecture] = root / architecture
        make_model(architecture).save_pretrained(saved[architecture], safe_serialization=True)
    return saved


# Llama is compiled in test_compile.py. The compile tier builds every architecture with
# ONNX and those whose lowering differs most with TVM too (fused projections and partial
# rotary, soft-capping, two RoPE tables, LayerNorm and learned positions); the slow tier
# (`make test-slow`) adds TVM for the rest, so every architecture meets both backends.
IN_CI_TVM = ("Phi3ForCausalLM", "Gemma3ForCausalLM", "GPT2LMHeadModel")
BOTH_BACKENDS = [
    pytest.param(a, b, marks=() if b == "onnx" or a in IN_CI_TVM else pytest.mark.slow)
    for a in CONFIGS if a != "LlamaForCausalLM" for b in ("tvm", "onnx")
]


@pytest.mark.parametrize(("architecture", "backend"), BOTH_BACKENDS)
def test_architecture_compiles_with_greedy_decode_parity(checkpoints: dict[str, Path], architecture: str, backend: str, tmp_path: Path) -> None:
    out = tmp_path / "artifact"
    result = runner.invoke(app, ["compile", str(checkpoints[architecture]), "--backend", backend, "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    parity = json.loads(result.stdout)["parity"]
    assert parity["ok"] is True and parity["generation"] == {**parity["generation"], "steps": 32, "matched": 32}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["architecture"] == architecture and manifest["lm"]["architecture"] == architecture


RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@pytest.mark.parametrize(
    ("architecture", "backend", "sets"),
    [
        # int8 weights follow the layout: GPT-2's embedding is transformer.wte, its linears were Conv1D.
        ("GPT2LMHeadModel", "tvm", ["--recipe", str(RECIPES / "int8-weights.yaml")]),
        ("Qwen3ForCausalLM", "onnx", ["--recipe", str(RECIPES / "int8-weights.yaml")]),
        # act on Gemma 3 (QK-norm, sandwich norms, a sliding layer) with the carried column sums.
        ("Gemma3ForCausalLM", "tvm", ["--recipe", str(RECIPES / "act.yaml"), "--set", "act.heads={0: [1, 2], 1: [0]}"]),
    ],
)
def test_passes_apply_beyond_llama(checkpoints: dict[str, Path], architecture: str, backend: str, sets: list[str], tmp_path: Path) -> None:
    out = tmp_path / "artifact"
    result = runner.invoke(app, ["compile", str(checkpoints[architecture]), "--backend", backend, *sets, "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    summary = json.loads(result.stdout)
    assert summary["parity"]["ok"] is True and summary["passes"][0]["changed"] is True
    assert summary["parity"]["generation"]["matched"] == 32
    manifest = json.loads((out / "manifest.json").read_text())
    if "act" in sets[1]:
        assert [c["input"] for c in manifest["program"]["cache"]] == ["past_k", "past_v", "past_s"]


def test_act_is_refused_where_q_k_v_are_one_projection(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    result = runner.invoke(app, ["compile", str(checkpoints["Phi3ForCausalLM"]), "--recipe", str(RECIPES / "act.yaml"),
                                 "--set", "act.heads={0: [1]}", "-o", str(tmp_path / "out")])
    assert result.exit_code == 3 and "model.layers.0.self_attn (Phi3Attention) projects q, k and v with one fused qkv_proj" in result.output
    assert not (tmp_path / "out").exists()


ON_DEVICE = [
    pytest.param(a, b, marks=() if (a, b) in (("Gemma3ForCausalLM", "tvm"), ("Phi3ForCausalLM", "onnx"), ("GPT2LMHeadModel", "onnx")) else pytest.mark.slow)
    for a in CONFIGS if a != "LlamaForCausalLM" for b in ("tvm", "onnx")
]


@pytest.mark.arm64
@pytest.mark.parametrize(("architecture", "backend"), ON_DEVICE)
def test_architecture_deploys_with_greedy_decode_parity_on_the_emulated_device(
    checkpoints: dict[str, Path], architecture: str, backend: str, tmp_path: Path
) -> None:
    out = tmp_path / "arm64"
    built = runner.invoke(app, ["compile", str(checkpoints[architecture]), "--target", "arm64", "--backend", backend, "-o", str(out)])
    assert built.exit_code == 0, built.output + built.stderr
    deployed = runner.invoke(app, ["deploy", str(out), "--device", "qemu-arm64", "--json"])
    assert deployed.exit_code == 0, deployed.output + deployed.stderr
    parity = json.loads(deployed.stdout)["parity"]
    assert parity["ok"] is True and parity["generation"]["matched"] == 32
