"""A real trained encoder (zoo:minilm-l6, all-MiniLM-L6-v2) through both backends: parity
on padded real sentences, `run --text`, similarity and retrieval scored in the artifact
equal to torch; built for arm64, deployed and profiled on the emulated device."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from edgec.cli import app
from edgec.families.encoder import retrieval_set

runner = CliRunner()
BACKENDS = ("tvm", "onnx")


def cli_json(*args: str) -> dict[str, Any]:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("minilm")
    built = {}
    for backend in BACKENDS:
        built[backend] = root / backend
        summary = cli_json("compile", "zoo:minilm-l6", "--backend", backend, "-o", str(built[backend]))
        assert summary["parity"]["ok"] is True
    return built


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synonym lists against their own gloss (score 1) or another synset's (score 0)."""
    queries, documents = retrieval_set(3, 24)
    rows = [f"{q}\t{documents[i]}\t1" for i, q in enumerate(queries)] + [f"{q}\t{documents[(i + 7) % 24]}\t0" for i, q in enumerate(queries)]
    path = tmp_path_factory.mktemp("pairs") / "pairs.tsv"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.compile
@pytest.mark.parametrize("backend", BACKENDS)
def test_encoder_artifact_embeds_and_scores_like_torch(artifacts: dict[str, Path], backend: str, pairs: Path) -> None:
    out = artifacts[backend]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["encoder"]["pooling"] == "mean" and manifest["encoder"]["normalize"] is True
    assert manifest["program"] == {"kind": "forward", "entries": {"embed": {
        "inputs": ["input_ids", "attention_mask"], "outputs": ["sentence_embedding"],
        "input_shapes": {"input_ids": [None, None], "attention_mask": [None, None]},
    }}}
    assert [c["ok"] for c in cli_json("verify", str(out))["checks"]] == [True, True, True]
    ran = cli_json("run", str(out), "--text", "A phone runs the model.", "--text", "Edge devices are small.")
    assert ran["size"] == 384 and all(abs(n - 1.0) < 1e-5 for n in ran["norms"])
    for task, extra, figure in (("similarity", ["--data", str(pairs)], "spearman"), ("retrieval", ["--samples", "60"], "mrr")):
        ours = cli_json("eval", str(out), "--task", task, *extra)
        theirs = cli_json("eval", "zoo:minilm-l6", "--task", task, *extra)
        assert ours[figure] == pytest.approx(theirs[figure], abs=1e-6)
    assert ours["recall_at_1"] > 10 * ours["chance_recall_at_1"]


@pytest.mark.arm64
@pytest.mark.parametrize("backend", BACKENDS)
def test_encoder_deploys_and_profiles_on_the_emulated_device(tmp_path: Path, backend: str) -> None:
    out = tmp_path / f"minilm-arm64-{backend}"
    cli_json("compile", "zoo:minilm-l6", "--target", "arm64", "--backend", backend, "-o", str(out))
    deployed = cli_json("deploy", str(out), "--device", "qemu-arm64")
    assert deployed["machine"] == "aarch64" and deployed["parity"]["ok"] is True
    profiled = cli_json("profile", str(out), "--device", "qemu-arm64", "--runs", "2")
    assert profiled["entry"] == "embed" and profiled["emulated"] is True and profiled["per_op_ms"]
