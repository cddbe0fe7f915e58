"""`edgec bench`: an artifact timed on this machine over a sweep of threads, prompt
lengths and decode steps, as a table, CSV or JSON."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgec.cli import app

pytestmark = pytest.mark.compile
runner = CliRunner()


@pytest.fixture(scope="module")
def artifacts(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bench")
    built = {}
    for target in ("cpu", "arm64"):
        built[target] = root / target
        result = runner.invoke(app, ["compile", str(tiny_llama_dir), "--backend", "onnx", "--target", target, "-o", str(built[target])])
        assert result.exit_code == 0, result.output
    return built


def test_a_sweep_gives_one_row_per_point_with_the_profile_percentiles(artifacts: dict[str, Path]) -> None:
    result = runner.invoke(app, ["bench", str(artifacts["cpu"]), "-t", "1,2", "-p", "8,4", "-n", "0,3", "-r", "2", "--format", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    points = [(r["threads"], r["batch"], r["prompt_tokens"], r["new_tokens"]) for r in report["rows"]]
    assert points == [(t, 1, p, n) for t in (1, 2) for p in (4, 8) for n in (0, 3)]
    for row in report["rows"]:
        assert row["latency"]["runs"] == 2 and 0 < row["latency"]["p50_ms"] <= row["latency"]["p99_ms"]
        if row["new_tokens"] == 0:
            assert row["decode"] is None and row["decode_tokens_per_s"] is None
        else:
            assert row["decode"]["runs"] == 2 * 3 and row["decode_tokens_per_s"] == pytest.approx(1e3 / row["decode"]["p50_ms"])


def test_csv_has_the_documented_columns_and_a_line_per_point(artifacts: dict[str, Path]) -> None:
    result = runner.invoke(app, ["bench", str(artifacts["cpu"]), "-t", "1", "-p", "4,6,8", "-n", "2", "-r", "1", "--format", "csv"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [int(r["prompt_tokens"]) for r in rows] == [4, 6, 8]
    assert list(rows[0]) == ["threads", "batch", "prompt_tokens", "new_tokens", "latency_p50_ms", "latency_p90_ms", "latency_p99_ms",
                             "decode_p50_ms", "decode_p90_ms", "decode_tokens_per_s"]
    assert all(float(r["decode_tokens_per_s"]) > 0 for r in rows)


@pytest.mark.parametrize(("args", "code", "needle"), [
    (["-t", "0"], 2, "--threads '0': give whole numbers >= 1"),
    (["-p", "a,b"], 2, "--prompt-len 'a,b'"),
    (["--format", "xml"], 2, "--format 'xml': give one of table, csv, json"),
    (["-p", "100000"], 2, "exceeds the artifact's max context"),
    (["-b", "0"], 2, "--batch '0': give whole numbers >= 1"),
])
def test_bad_sweeps_are_refused_in_one_line(artifacts: dict[str, Path], args: list[str], code: int, needle: str) -> None:
    result = runner.invoke(app, ["bench", str(artifacts["cpu"]), *args])
    assert result.exit_code == code and needle in result.output and "Traceback" not in result.output, result.output


def test_an_artifact_for_another_machine_is_sent_to_profile(artifacts: dict[str, Path]) -> None:
    result = runner.invoke(app, ["bench", str(artifacts["arm64"])])
    assert result.exit_code == 3 and "cannot run here" in result.output and "deploy it to a matching device" in result.output, result.output


def test_a_batch_sweep_decodes_every_row_and_counts_its_tokens(artifacts: dict[str, Path]) -> None:
    result = runner.invoke(app, ["bench", str(artifacts["cpu"]), "-t", "1", "-b", "3,1", "-p", "5", "-n", "2", "-r", "2", "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert [(r["batch"], r["prompt_tokens"], r["new_tokens"]) for r in rows] == [(1, 5, 2), (3, 5, 2)]
    for row in rows:
        assert row["decode"]["runs"] == 2 * 2
        assert row["decode_tokens_per_s"] == pytest.approx(row["batch"] * 1e3 / row["decode"]["p50_ms"])


def _linear_onnx(path: Path, batch: int | str) -> Path:
    """y = x @ W on [batch, 4] inputs; a string batch is a dynamic axis."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.arange(16, dtype=np.float32).reshape(4, 4) / 16, "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "linear",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])], initializer=[weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_batch_sweeps_a_dynamic_axis_and_refuses_a_fixed_one_by_name(tmp_path: Path) -> None:
    for batch in ("N", 2):
        model = _linear_onnx(tmp_path / f"linear-{batch}.onnx", batch)
        out = tmp_path / f"art-{batch}"
        built = runner.invoke(app, ["compile", str(model), "--backend", "onnx", "--target", "cpu", "-o", str(out)])
        assert built.exit_code == 0, built.output
        swept = runner.invoke(app, ["bench", str(out), "-t", "1", "-b", "1,4", "-r", "2", "--format", "json"])
        if batch == "N":
            assert swept.exit_code == 0, swept.output
            assert [(r["batch"], r["latency"]["runs"]) for r in json.loads(swept.stdout)["rows"]] == [(1, 2), (4, 2)]
        else:
            assert swept.exit_code == 2, swept.output
            assert "--batch 4: input 'x'" in swept.output and "fixed batch of 2" in swept.output and "Traceback" not in swept.output
