"""schedule.activations: int8 end to end on zoo:tiny-lm: the TVM build runs every 4-/8-bit
linear that fits on the integer dot-product kernel (VNNI here; the arm64 build's sdot:
test_deploy_qemu.py), stores the tiles once for the tied embedding and lm_head, and
keeps perplexity within a hair of float activations; the ONNX backend refuses the option."""

from __future__ import annotations

import json
import math
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import tvm
from safetensors import safe_open
from typer.testing import CliRunner

from edgec.cli import app
from edgec.targets.registry import host_mcpu
from edgec.targets.tvm_dot import dot_isa
from tests.targets.test_compile_luc import compile_json

pytestmark = pytest.mark.compile
runner = CliRunner()
# Linears at 4 bits on the offset grid in groups of 32, the tied table at 8 bits.
RECIPE = """
target: cpu
calibration: {samples: 4, seq_len: 64}
evaluate: {tokens: 1024, window: 128}
parity: {rtol: 0.01}
passes:
  - name: luc
    options: {policy: uniform, bits: 4, sparsity: 0, bit_choices: [4], group_size: 32, symmetric: false, offset: true,
              embedding_bits: 8, quantizer: rtn, validation_samples: 2}
  - name: schedule
    options: {trials: 0}
"""
# tiny-lm: 6 layers of hidden 256 / MLP 688, 4 KV heads of 32, vocab 4096 (tied).
LAYERS, HIDDEN, MLP, KV, VOCAB = 6, 256, 688, 128, 4096
HAS_VNNI = dot_isa(tvm.target.Target({"kind": "llvm", "mcpu": host_mcpu()})) is not None


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[Path, dict]]]:
    root = tmp_path_factory.mktemp("int8")
    recipe = root / "w4.yaml"
    recipe.write_text(RECIPE)
    int8 = ["--set", "schedule.activations=int8"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGEC_CACHE_DIR", str(root / "cache"))
        yield {
            "float": (root / "float", compile_json(recipe, root / "float")),
            "tvm": (root / "tvm", compile_json(recipe, root / "tvm", *int8)),
        }


@pytest.mark.skipif(not HAS_VNNI, reason="the host CPU has no AVX-512 VNNI: the cpu target keeps float activations")
def test_every_linear_that_fits_runs_on_the_dot_kernel_with_one_stored_table(built: dict) -> None:
    out, _ = built["tvm"]
    record = json.loads((out / "manifest.json").read_text())["backend_record"]["activations"]
    # Per layer q, k, v, o, gate, up; not down, whose 688 inputs end in a ragged group;
    # plus the tied lm_head (8 bits). q, k, v share one kernel, gate and up another.
    linears, kernels = LAYERS * 6 + 1, LAYERS * 3 + 1
    assert record == {"requested": "int8", "isa": "avx512-vnni", "dot_linears": {"prefill": linears, "decode": linears},
                      "dot_kernels": {"prefill": kernels, "decode": kernels}}
    with safe_open(str(out / "model" / "params.safetensors"), "numpy") as params:
        shapes = [tuple(params.get_slice(name).get_shape()) for name in params.keys()]
    # Tiles of 16 outputs x 8 inputs (4 bits) / 4 inputs (8 bits), 64 bytes each; a fused
    # kernel's tiles concatenated (q, k, v: HIDDEN + 2 KV outputs; gate, up: 2 MLP).
    tiles = {((HIDDEN + 2 * KV) // 16, HIDDEN // 8, 64): LAYERS, (HIDDEN // 16, HIDDEN // 8, 64): LAYERS,
             (2 * MLP // 16, HIDDEN // 8, 64): LAYERS, (VOCAB // 16, HIDDEN // 4, 64): 1}
    assert {shape: shapes.count(shape) for shape in tiles} == tiles
    # The 8-bit table once, as tiles: no [HIDDEN, VOCAB] transposed copy for a float kernel.
    assert [s for s in shapes if math.prod(s) == VOCAB * HIDDEN] == [(VOCAB // 16, HIDDEN // 4, 64)]
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(out / "model" / "decode.so")],
                             capture_output=True, text=True, check=True).stdout
    assert listing.count("vpdpbusd") >= 3  # 4-bit (two per load) and 8-bit kernels


def test_every_softmax_and_sigmoid_of_the_build_computes_exp_without_libm(built: dict) -> None:
    out, _ = built["float"]
    record = json.loads((out / "manifest.json").read_text())["backend_record"]
    # Decode's softmaxes are inside its attention kernels (targets/tvm_attention), whose exp is arithmetic too.
    assert record["fast_exp"] == {"prefill": {"sigmoid": LAYERS, "softmax": LAYERS}, "decode": {"sigmoid": LAYERS}}
    assert record["attention_kernels"] == {"decode": LAYERS}
    for entry in ("prefill", "decode"):
        listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(out / "model" / f"{entry}.so")],
                                 capture_output=True, text=True, check=True).stdout
        assert "<expf@plt>" not in listing and "<sinf@plt>" in listing  # only the rotary tables use libm


@pytest.mark.skipif(not HAS_VNNI, reason="the host CPU has no AVX-512 VNNI: the cpu target keeps float activations")
def test_int8_activations_keep_parity_and_perplexity(built: dict) -> None:
    _, floats = built["float"]
    _, int8 = built["tvm"]
    assert int8["parity"]["ok"] is True and floats["parity"]["ok"] is True
    # Not bit-identical (inputs rounded to 8 bits per group), but within 1% of the logits' range...
    assert 0 < int8["parity"]["max_abs_diff"] <= int8["parity"]["tolerance"]
    # ...and within 0.5% of float activations' perplexity on the same weights.
    ratio = int8["evaluation"]["perplexity"] / floats["evaluation"]["perplexity"]
    assert abs(ratio - 1) < 0.005, ratio


def test_int8_activations_are_refused_for_onnx_before_any_work(tmp_path: Path) -> None:
    recipe = tmp_path / "w4.yaml"
    recipe.write_text(RECIPE)
    result = runner.invoke(app, ["compile", "zoo:tiny-lm", "--recipe", str(recipe), "--set", "schedule.activations=int8",
                                 "--backend", "onnx", "-o", str(tmp_path / "x")])
    assert result.exit_code == 3, result.output
    assert "schedule.activations=int8 is built by the TVM backend" in result.output and "load zoo:tiny-lm" not in result.output
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(not HAS_VNNI, reason="the host CPU has no AVX-512 VNNI: the cpu target keeps float activations")
def test_parity_failure_with_int8_activations_names_the_tolerance(built: dict, tmp_path: Path) -> None:
    recipe = tmp_path / "w4.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "strict"
    result = runner.invoke(app, ["compile", "zoo:tiny-lm", "--recipe", str(recipe), "--set", "schedule.activations=int8",
                                 "--set", "parity.rtol=1e-4", "-o", str(out)])
    assert result.exit_code == 4 and not out.exists(), result.output
    assert "int8 activations" in result.output and "parity.rtol" in result.output
