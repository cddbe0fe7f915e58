"""act artifacts through both backends on a model with planted sinks: parity against the
calibrated torch model, on prompts whose sinks sit at non-initial positions, for prefill
and for decode with the carried column sums."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from edgec.artifact import open_runtime, read_manifest
from edgec.cli import app
from edgec.lm import CausalLMEntries
from edgec.passes.act import install
from edgec.sinks import SinkRule
from tests.conftest import SINK_TOKEN, make_planted_sink_llama, planted_prompt

pytestmark = pytest.mark.compile
runner = CliRunner()
HEADS = "{0: [0, 1, 2, 3], 1: [2]}"
BACKENDS = ("tvm", "onnx")


@pytest.fixture(scope="module")
def built(planted_sink_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    root = tmp_path_factory.mktemp("act")
    artifacts = {}
    for backend in BACKENDS:
        out = root / backend
        result = runner.invoke(app, ["compile", str(planted_sink_llama_dir), "--recipe", "recipes/act.yaml", "--backend", backend,
                                     "--set", f"act.heads={HEADS}", "-o", str(out), "--json"])
        assert result.exit_code == 0, result.output + result.stderr
        artifacts[backend] = out
    yield artifacts


def calibrated_entries(stat: str = "causal", appended: bool = True) -> tuple[CausalLMEntries, CausalLMEntries]:
    model = make_planted_sink_llama()
    install(model, {0: [0, 1, 2, 3], 1: [2]}, SinkRule(stat=stat))  # type: ignore[arg-type]
    return (CausalLMEntries(model, appended_cache=appended).eval(),
            CausalLMEntries(make_planted_sink_llama(), appended_cache=appended).eval())


@pytest.mark.parametrize("backend", BACKENDS)
def test_manifest_carries_the_head_table_and_the_cache_layout(built: dict[str, Path], backend: str) -> None:
    manifest = read_manifest(built[backend])
    record = manifest["passes"][0]["record"]
    assert record["table"] == [{"layer": 0, "heads": [0, 1, 2, 3]}, {"layer": 1, "heads": [2]}]
    assert record["rule"] == {"beta": 0.4, "threshold_mode": "absolute", "threshold": 0.1, "keep_first": True, "stat": "causal"}
    assert record["phases"] == ["prefill", "decode"]
    assert manifest["parity"]["ok"] is True
    assert [c["input"] for c in manifest["lm"]["cache"]] == ["past_k", "past_v", "past_s"]
    assert manifest["lm"]["cache"][2]["layout"] == ["calibrated_heads", "batch", "tokens"]
    assert manifest["reference"]["entries"]["prefill"]["outputs"][-1] == "present_s"


@pytest.mark.parametrize("backend", BACKENDS)
def test_artifact_matches_calibrated_torch_on_planted_sinks(built: dict[str, Path], backend: str) -> None:
    manifest = read_manifest(built[backend])
    runtime = open_runtime(built[backend], manifest)
    calibrated, plain = calibrated_entries(appended=manifest["lm"]["cache"][0]["append"])
    prompts = np.asarray([planted_prompt(), planted_prompt()], dtype=np.int64)
    prompts[1, 3], prompts[1, 6] = prompts[1, 4], SINK_TOKEN  # different sink positions per row
    logits, k, v, s = runtime.run("prefill", [prompts[:, :-1]])
    with torch.no_grad():
        want = calibrated.prefill(torch.from_numpy(prompts[:, :-1]))
        uncalibrated = plain.prefill(torch.from_numpy(prompts[:, :-1]))[0].numpy()
    scale = float(np.abs(want[0].numpy()).max())
    for got, expected in zip((logits, k, v, s), want):
        assert np.abs(got - expected.numpy()).max() <= 1e-4 * scale
    # The calibration is really in the graph: the artifact is far from the plain model.
    assert np.abs(logits - uncalibrated).max() > 100 * np.abs(logits - want[0].numpy()).max()
    step_logits, *_, step_s = runtime.run("decode", [prompts[:, -1:], k, v, s])
    with torch.no_grad():
        full_logits, *_, full_s = calibrated.prefill(torch.from_numpy(prompts))
    assert np.abs(step_logits[:, 0] - full_logits[:, -1].numpy()).max() <= 1e-4 * scale
    assert np.abs(step_s - full_s.numpy()).max() <= 1e-4
