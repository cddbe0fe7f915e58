"""cache_dtype=float16 and int8 end to end on zoo:tiny-lm: the TVM artifact's K and V are
float16 (half the bytes a long-context decode step reads) or int8 at fixed scales (a
quarter) between calls, the runner keeps them so, parity and perplexity hold against the
float32 cache, also the perplexity of decode steps, which read the cache; a backend that
would convert the whole cache on every step refuses the option before any work."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgec.artifact import open_runtime, read_manifest
from edgec.cli import app
from edgec.evaluate import decode_perplexity, evaluation_ids
from edgec.model import load_model
from edgec.targets.runtime import Generation
from tests.targets.test_compile_luc import compile_json

pytestmark = pytest.mark.compile
runner = CliRunner()
RECIPE = """
target: cpu
evaluate: {tokens: 1024, window: 128}
"""
LAYERS = 6


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[Path, dict]]]:
    root = tmp_path_factory.mktemp("cache")
    recipe = root / "dense.yaml"
    recipe.write_text(RECIPE)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGEC_CACHE_DIR", str(root / "cache"))
        yield {dtype: (root / dtype, compile_json(recipe, root / dtype, "--set", f"cache_dtype={dtype}"))
               for dtype in ("float32", "float16", "int8")}


def test_a_float16_cache_stays_float16_and_keeps_parity_and_perplexity(built: dict) -> None:
    (out16, half), (_, full) = built["float16"], built["float32"]
    for out, dtype in ((out16, "float16"), (built["float32"][0], "float32")):
        manifest = read_manifest(out)
        assert [c["dtype"] for c in manifest["program"]["cache"]] == [dtype, dtype]
        # Each layer's decode attention is one kernel that reads the cache where it lies and
        # converts as it reads (a cast would be a copy); no attention matmul is left.
        assert manifest["backend_record"]["attention_kernels"] == {"decode": LAYERS}
        assert "view_matmuls" not in manifest["backend_record"]
    assert half["parity"]["ok"] is True and full["parity"]["ok"] is True
    ratio = half["evaluation"]["perplexity"] / full["evaluation"]["perplexity"]
    assert abs(ratio - 1) < 0.002, ratio

    manifest = read_manifest(out16)
    runtime, generation = open_runtime(out16, manifest), Generation(manifest["program"])
    tokens = generation.greedy(lambda entry, args: runtime.run(entry, args, native=True), list(range(5, 25)), 6)
    assert len(tokens) == 6
    for cache in generation.appended.values():
        assert str(cache.buffer.dtype) == "float16" and cache.length == 20 + 5
        assert np.isfinite(cache.value.numpy().astype(np.float32)).all()


def test_an_int8_cache_stays_int8_and_decodes_as_well_as_the_float32_cache(built: dict) -> None:
    (out8, quarter), (out32, full) = built["int8"], built["float32"]
    manifest = read_manifest(out8)
    assert [c["dtype"] for c in manifest["program"]["cache"]] == ["int8", "int8"]
    assert manifest["backend_record"]["attention_kernels"] == {"decode": LAYERS}
    assert quarter["parity"]["ok"] is True
    # Windowed perplexity runs prefills only, which never read the cache: unchanged.
    assert abs(quarter["evaluation"]["perplexity"] / full["evaluation"]["perplexity"] - 1) < 0.002
    # Decode steps read it: 400 held-out tokens scored one step at a time.
    ids, _ = evaluation_ids(load_model("zoo:tiny-lm", False).tokenizer, "held-out", 400)
    manifests = {out: read_manifest(out) for out in (out8, out32, built["float16"][0])}
    ppl = {out: decode_perplexity(open_runtime(out, m), m["program"], ids, 1) for out, m in manifests.items()}
    assert abs(ppl[out8] / ppl[out32] - 1) < 0.005, ppl  # measured: +0.05% over 500 tokens
    assert abs(ppl[built["float16"][0]] / ppl[out32] - 1) < 0.001, ppl

    runtime, generation = open_runtime(out8, manifest), Generation(manifest["program"])
    tokens = generation.greedy(lambda entry, args: runtime.run(entry, args, native=True), list(range(5, 25)), 6)
    assert len(tokens) == 6
    for cache in generation.appended.values():
        assert str(cache.buffer.dtype) == "int8" and cache.length == 20 + 5
        assert np.abs(cache.value.numpy()).max() > 16  # the levels are used, not a cache of zeros


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_a_narrow_cache_is_refused_for_onnx_before_any_work(tmp_path: Path, dtype: str) -> None:
    out = tmp_path / "x"
    result = runner.invoke(app, ["compile", "zoo:tiny-lm", "--set", f"cache_dtype={dtype}", "--backend", "onnx", "-o", str(out)])
    assert result.exit_code == 3, result.output
    assert f"cache_dtype={dtype}" in result.output and "--backend tvm" in result.output
    assert "load zoo:tiny-lm" not in result.output and not out.exists()
