"""Every supported decoder architecture, as a tiny random checkpoint on disk, compiles
through both backends; parity covers prefill, one decode step and a 32-token greedy
generation in the artifact's runtime against torch."""

from __future__ import annotations

import json
import shutil
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


LUC_RECIPE = """
target: cpu
calibration: {samples: 6, seq_len: 64}
evaluate: {tokens: 512, window: 128}
passes:
  - name: luc
    options: {bits: 4, sparsity: 0.3, bit_choices: [4, 8], group_size: 16, embedding_bits: 4, probe_samples: 2, validation_samples: 2}
"""
ZOO_TINY_LM = Path(__file__).resolve().parents[2] / "edgec" / "zoo" / "tiny-lm"


@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random checkpoints that carry zoo:tiny-lm's tokenizer (vocabulary 4096), so the
    passes that calibrate on text can run on them."""
    root = tmp_path_factory.mktemp("with-tokenizer")
    saved = {}
    for architecture in ("Gemma3ForCausalLM", "GPT2LMHeadModel", "Qwen3ForCausalLM"):
        saved[architecture] = root / architecture
        make_model(architecture, vocab_size=4096).save_pretrained(saved[architecture], safe_serialization=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(ZOO_TINY_LM / name, saved[architecture] / name)
    return saved


# luc compresses by the layout: Gemma 3's tied scaled embedding and sandwich norms, GPT-2's
# Conv1D linears and learned positions.
@pytest.mark.parametrize(
    ("architecture", "backend"),
    [("Gemma3ForCausalLM", "onnx"), ("GPT2LMHeadModel", "onnx"),
     pytest.param("Qwen3ForCausalLM", "tvm", marks=pytest.mark.slow), pytest.param("Gemma3ForCausalLM", "tvm", marks=pytest.mark.slow)],
)
def test_luc_compresses_beyond_llama_with_greedy_parity(with_tokenizer: dict[str, Path], architecture: str, backend: str, tmp_path: Path) -> None:
    recipe = tmp_path / "luc.yaml"
    recipe.write_text(LUC_RECIPE)
    out = tmp_path / "artifact"
    result = runner.invoke(app, ["compile", str(with_tokenizer[architecture]), "--recipe", str(recipe), "--backend", backend, "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    summary = json.loads(result.stdout)
    assert summary["parity"]["ok"] is True and summary["parity"]["generation"]["matched"] == 32
    record = summary["passes"][0]["record"]
    assert len(record["layers"]) == 2 and record["achieved"]["bits"] == 4.0 and abs(record["achieved"]["sparsity"] - 0.3) < 0.02
    assert record["weight_bytes_after"] < record["weight_bytes_before"] / 5
    # The tiny configs have 64 positions: the recipe's 128-token evaluation window is held to them.
    assert summary["evaluation"]["window"] == 64 and summary["evaluation"]["tokens"] >= 500


def test_calibration_longer_than_the_positions_is_refused_before_work(with_tokenizer: dict[str, Path], tmp_path: Path) -> None:
    recipe = tmp_path / "luc.yaml"
    recipe.write_text(LUC_RECIPE)
    out = tmp_path / "artifact"
    result = runner.invoke(app, ["compile", str(with_tokenizer["GPT2LMHeadModel"]), "--recipe", str(recipe),
                                 "--set", "calibration.seq_len=100", "--backend", "onnx", "-o", str(out)])
    assert result.exit_code == 2 and "calibration.seq_len 100 is longer than the model's 64 positions" in result.output
    assert not out.exists() and "Traceback" not in result.output
