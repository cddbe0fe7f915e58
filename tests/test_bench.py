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
    points = [(r["threads"], r["prompt_tokens"], r["new_tokens"]) for r in report["rows"]]
    assert points == [(t, p, n) for t in (1, 2) for p in (4, 8) for n in (0, 3)]
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
    assert list(rows[0]) == ["threads", "prompt_tokens", "new_tokens", "latency_p50_ms", "latency_p90_ms", "latency_p99_ms",
                             "decode_p50_ms", "decode_p90_ms", "decode_tokens_per_s"]
    assert all(float(r["decode_tokens_per_s"]) > 0 for r in rows)


@pytest.mark.parametrize(("args", "code", "needle"), [
    (["-t", "0"], 2, "--threads '0': give whole numbers >= 1"),
    (["-p", "a,b"], 2, "--prompt-len 'a,b'"),
    (["--format", "xml"], 2, "--format 'xml': give one of table, csv, json"),
    (["-p", "100000"], 2, "exceeds the artifact's max context"),
])
def test_bad_sweeps_are_refused_in_one_line(artifacts: dict[str, Path], args: list[str], code: int, needle: str) -> None:
    result = runner.invoke(app, ["bench", str(artifacts["cpu"]), *args])
    assert result.exit_code == code and needle in result.output and "Traceback" not in result.output, result.output


def test_an_artifact_for_another_machine_is_sent_to_profile(artifacts: dict[str, Path]) -> None:
    result = runner.invoke(app, ["bench", str(artifacts["arm64"])])
    assert result.exit_code == 3 and "cannot run here" in result.output and "deploy it to a matching device" in result.output, result.output
