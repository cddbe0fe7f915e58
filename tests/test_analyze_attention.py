"""`edgec analyze attention`: the per-(layer, head) sink table, heat maps, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from typer.testing import CliRunner

from edgec.cli import app

runner = CliRunner()


def test_sink_table_has_every_head_with_both_threshold_forms(tmp_path: Path) -> None:
    plots = tmp_path / "plots"
    result = runner.invoke(app, ["analyze", "attention", "zoo:tiny-lm", "--data", "wordnet", "--samples", "2", "--plot", str(plots), "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads(result.stdout)
    assert len(report["heads"]) == 6 * 8 and len(report["prompts"]) == 2
    sinks = [s for row in report["heads"] for s in row["sinks"]]
    assert sinks and all({"prompt", "position", "token", "score", "absolute", "alpha"} <= set(s) for s in sinks)
    assert all(s["score"] > 0.1 for s in sinks if s["absolute"])
    summary = report["summary"]
    assert summary["initial_sinks"] + summary["non_initial_sinks"] == summary["sinks"] == len(sinks)
    assert summary["hidden_sinks"] == sum(row["hidden"] for row in report["heads"])
    assert len(report["plots"]) == 6 and all(Path(p).read_bytes()[:4] == b"\x89PNG" for p in report["plots"])
    text = runner.invoke(app, ["analyze", "attention", "zoo:tiny-lm", "--samples", "1"])
    assert text.exit_code == 0 and "hidden sinks receive the most attention" in text.stdout


def test_prompts_from_a_text_file_and_bad_inputs(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The cat sat on the mat.\n\nTo be or not to be, that is the question.\n")
    result = runner.invoke(app, ["analyze", "attention", "zoo:tiny-lm", "--data", str(prompts), "--json"])
    assert result.exit_code == 0, result.stderr
    assert [p["text"] for p in json.loads(result.stdout)["prompts"]] == ["The cat sat on the mat.", "To be or not to be, that is the question."]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    for data, message in ((str(empty), "has no non-empty lines"), (str(tmp_path / "missing.txt"), "missing.txt")):
        bad = runner.invoke(app, ["analyze", "attention", "zoo:tiny-lm", "--data", data])
        assert bad.exit_code == 2 and message in bad.stderr and "Traceback" not in bad.output
    onnx_path = tmp_path / "mlp.onnx"
    torch.onnx.export(torch.nn.Sequential(torch.nn.Linear(4, 4)), (torch.zeros(1, 4),), str(onnx_path), dynamo=False)
    graph = runner.invoke(app, ["analyze", "attention", str(onnx_path)])
    assert graph.exit_code == 3 and "has no attention to analyse" in graph.stderr
