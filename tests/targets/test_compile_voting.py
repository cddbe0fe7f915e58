"""A model tuned with exits compiles to a voting artifact on both backends: parity against
torch's voting, `run` and `eval` use the voted distribution, exits chosen by the recipe."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgec.artifact import load_reference, read_manifest
from edgec.cli import app
from tests.conftest import CHEAP_LUC, edge_llm_tuned

pytestmark = pytest.mark.compile
runner = CliRunner()


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return edge_llm_tuned(tmp_path_factory.mktemp("voting"), stride=2)  # exits after layers 1, 3, 5


def _compile(model: Path, out: Path, *args: str) -> dict:
    result = runner.invoke(app, ["compile", str(model), "-o", str(out), "--json", *args])
    assert result.exit_code == 0, result.output + result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("backend", ["tvm", "onnx"])
def test_voting_artifact_passes_parity_and_run_and_eval_use_the_vote(tuned: Path, tmp_path: Path, backend: str) -> None:
    out = tmp_path / backend
    summary = _compile(tuned, out, "--backend", backend)
    assert summary["parity"]["ok"] is True and summary["parity"]["generation"]["matched"] == 32
    manifest = read_manifest(out)
    assert manifest["lm"]["voting"]["exits"] == [1, 3, 5] == manifest["lm"]["voting"]["model_exits"]
    entries = manifest["program"]["entries"]
    assert entries["prefill"]["outputs"] == ["logits", "present_k", "present_v", "exit_logits"]
    # The voted output is a log-distribution: its exponentials sum to 1 at every position,
    # and it is the renormalised max of the exits' softmaxes (the reference outputs parity held the artifact to).
    reference = load_reference(out)
    voted, exits = reference["prefill.out.0"], reference["prefill.out.3"]
    probs = np.exp(exits - exits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    best = probs.max(0)
    np.testing.assert_allclose(np.exp(voted), best / best.sum(-1, keepdims=True), rtol=1e-4, atol=1e-7)
    ran = runner.invoke(app, ["run", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "6", "--json"])
    assert ran.exit_code == 0, ran.output + ran.stderr
    assert 0 < json.loads(ran.stdout)["new_tokens"] <= 6
    scored = [runner.invoke(app, ["eval", spec, "--task", "ppl", "--tokens", "512", "--window", "128", "--json"]) for spec in (str(out), str(tuned))]
    assert all(r.exit_code == 0 for r in scored), [r.output for r in scored]
    artifact_ppl, torch_ppl = (json.loads(r.stdout)["perplexity"] for r in scored)
    assert abs(artifact_ppl - torch_ppl) < 1e-4 * torch_ppl  # the artifact's vote is torch's vote


def test_the_recipe_picks_the_voting_exits(tuned: Path, tmp_path: Path) -> None:
    summary = _compile(tuned, tmp_path / "two", "--backend", "onnx", "--set", "voting.exits=[3,5]")
    assert summary["parity"]["ok"] is True
    manifest = read_manifest(tmp_path / "two")
    assert manifest["lm"]["voting"]["exits"] == [3, 5] and manifest["lm"]["voting"]["model_exits"] == [1, 3, 5]
    assert load_reference(tmp_path / "two")["prefill.out.3"].shape[0] == 2


@pytest.fixture(scope="module")
def tuned_luc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return edge_llm_tuned(tmp_path_factory.mktemp("voting-luc"), stride=3, recipe=CHEAP_LUC)


@pytest.mark.parametrize("backend", ["tvm", "onnx"])
def test_a_tuned_compressed_model_compiles_with_packed_weights_adapters_and_votes(tuned_luc: Path, tmp_path: Path, backend: str) -> None:
    out = tmp_path / backend
    summary = _compile(tuned_luc, out, "--backend", backend)
    assert summary["parity"]["ok"] is True
    manifest = read_manifest(out)
    assert manifest["lm"]["voting"]["exits"] == [2, 5]
    assert [p["name"] for p in manifest["model"]["info"]["applied_passes"]] == ["luc"]
    # 4-bit weights stay packed: the artifact is a fraction of the fp32 model's weights.
    from edgec.zoo import zoo_path

    assert summary["size_bytes"] < 0.45 * (zoo_path("tiny-lm") / "model.safetensors").stat().st_size, summary["size_bytes"]
