"""Per-pass caching: a compile that stops after its passes (here SIGTERM at the export)
resumes on the next run from the passes' stored output, which is exactly the model they
made; a changed option, or a changed edgec, is a different key."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgec.compiler import _calibration
from edgec.model import load_model
from edgec.pass_cache import PassCache, base_key
from edgec.passes import REGISTRY, options_for
from edgec.pipeline import PassContext, PassManager
from edgec.recipe import Recipe, load_recipe
from tests.test_output_safety import wait_for

# luc (packed weights, a tied embedding and head that share them) then act (modules with
# no tensors): both kinds of module a pass puts in; cheap settings (no search, RTN). Groups
# of 96 leave a ragged last group in every width (256, 688), the embedding's too.
RECIPE = """\
target: cpu
backend: onnx
calibration: {data: train, samples: 8, seq_len: 64}
evaluate: {tokens: 0}
passes:
  - name: luc
    options: {policy: uniform, bits: 4, sparsity: 0.3, group_size: 96, quantizer: rtn}
  - name: act
    options: {heads: {0: [0, 1], 2: [3]}}
"""


def _recipe(tmp_path: Path, *sets: str) -> tuple[Path, Recipe]:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    return path, load_recipe(path, list(sets), options_for)


def _passes(recipe: Recipe, cache: bool) -> tuple[torch.nn.Module, list]:
    model = load_model("zoo:tiny-lm")
    assert model.module is not None
    ctx = PassContext(recipe=recipe, calibration_ids=_calibration(model, recipe))
    manager = PassManager(REGISTRY, recipe.passes)
    log = manager.run(model, ctx, PassCache(model.module), base_key(model.sha256, recipe)) if cache else manager.run(model, ctx)
    return model.module, log


def test_the_stored_output_of_the_passes_is_the_model_they_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEC_CACHE_DIR", str(tmp_path / "cache"))  # this test's entries only
    _, recipe = _recipe(tmp_path)
    made, made_log = _passes(recipe, cache=True)
    loaded, loaded_log = _passes(recipe, cache=True)
    assert [e.cached for e in made_log] == [False, False] and [e.cached for e in loaded_log] == [True, True]
    assert [(e.name, e.record) for e in loaded_log] == [(e.name, e.record) for e in made_log]
    assert {n: type(m) for n, m in loaded.named_modules()} == {n: type(m) for n, m in made.named_modules()}
    made_state, loaded_state = made.state_dict(), loaded.state_dict()
    assert made_state.keys() == loaded_state.keys()
    assert all(torch.equal(made_state[k], loaded_state[k]) for k in made_state)
    calibrated = {n: m.heads for n, m in loaded.named_modules() if type(m).__name__ == "AttentionCalibration"}
    assert calibrated == {"model.layers.0.self_attn.calibration": [0, 1], "model.layers.2.self_attn.calibration": [3]}
    # The tied embedding and head share their packed planes, as the exporters need.
    assert loaded.lm_head.plane0 is loaded.model.embed_tokens.plane0
    assert made.lm_head.plane0 is made.model.embed_tokens.plane0
    assert loaded.model.embed_tokens.embedding_dim == 256 and loaded.model.layers[0].mlp.down_proj.in_features == 688
    ids = torch.arange(3, 40).reshape(1, -1)
    with torch.no_grad():
        assert torch.equal(made(ids).logits, loaded(ids).logits)


def test_an_option_or_the_code_changes_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, recipe = _recipe(tmp_path)
    _, other = _recipe(tmp_path, "luc.bits=8")
    keys, other_keys = PassManager(REGISTRY, recipe.passes).keys("base"), PassManager(REGISTRY, other.passes).keys("base")
    assert len(set(keys) | set(other_keys)) == 4  # luc's option changes both keys after it
    import edgec.pass_cache as pass_cache

    sha = load_model("zoo:tiny-lm").sha256
    before = base_key(sha, recipe)
    monkeypatch.setattr(pass_cache, "code_digest", lambda: "another edgec")
    assert base_key(sha, recipe) != before


@pytest.mark.compile
def test_a_compile_stopped_after_its_passes_resumes_from_them(tmp_path: Path) -> None:
    recipe, _ = _recipe(tmp_path)
    command = [sys.executable, "-m", "edgec.cli", "compile", "zoo:tiny-lm", "--recipe", str(recipe), "-o", str(tmp_path / "out")]
    env = {**os.environ, "EDGEC_CACHE_DIR": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}  # this test's entries only
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    seen = wait_for(first, "export entries")
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM and "pass 2/2: act" in seen, seen
    second = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=900, env=env)
    assert second.returncode == 0, second.stderr
    assert "passes luc, act: output of an earlier run, from the pass cache (0 to run)" in second.stderr
    assert "pass 1/2" not in second.stderr
    summary = json.loads(second.stdout)
    assert summary["parity"]["ok"] is True
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [(p["name"], p["cached"]) for p in manifest["passes"]] == [("luc", True), ("act", True)]


def test_a_module_no_entry_could_rebuild_is_not_stored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stored, it would load as tensors with nowhere to go: the output is recomputed instead."""
    monkeypatch.setenv("EDGEC_CACHE_DIR", str(tmp_path))
    module = load_model("zoo:tiny-lm").module
    assert module is not None
    cache = PassCache(module)
    module.model.layers[0].mlp.extra = torch.nn.Linear(2, 2)
    cache.save("unknown-module", module, [])
    del module.model.layers[0].mlp.extra
    module.model.norm.weight.data = module.model.norm.weight.data * 2  # a known change: stored
    cache.save("changed-norm", module, [])
    assert not (tmp_path / "passes" / "unknown-module").exists()
    assert json.loads((tmp_path / "passes" / "changed-norm" / "record.json").read_text())["changed"] == ["model.norm.weight"]
