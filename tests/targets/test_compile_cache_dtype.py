"""cache_dtype=float16 end to end on zoo:tiny-lm: the TVM artifact's K and V are float16
between calls (half the bytes a long-context decode step reads), the runner keeps them so,
parity and perplexity hold against the float32 cache; a backend that would convert the whole
cache on every step refuses the option before any work."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgec.artifact import open_runtime, read_manifest
from edgec.cli import app
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
               for dtype in ("float32", "float16")}


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


def test_a_float16_cache_is_refused_for_onnx_before_any_work(tmp_path: Path) -> None:
    out = tmp_path / "x"
    result = runner.invoke(app, ["compile", "zoo:tiny-lm", "--set", "cache_dtype=float16", "--backend", "onnx", "-o", str(out)])
    assert result.exit_code == 3, result.output
    assert "cache_dtype=float16" in result.output and "--backend tvm" in result.output
    assert "load zoo:tiny-lm" not in result.output and not out.exists()
