"""`compile --subnet all`: every shape of zoo:tiny-lm's search (a 2-shape table) in one
artifact over one copy of the weights; each shape runs as its extracted subnet would, on
this CPU (ONNX Runtime) and on the emulated arm64 device (TVM)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from edgec.cli import app
from edgec.lm import CausalLMEntries, greedy_generate
from edgec.model import load_model
from edgec.subnet import parse_shape
from edgec.subnet.extract import extract
from edgec.subnet.search import SearchOptions, SubnetSearch, search_subnets
from tests.conftest import host_rpc_server

pytestmark = pytest.mark.compile
runner = CliRunner()
# Two shapes, both sliced (the default one too: its cache is ragged), of different depths.
SMALL = SearchOptions(samples=4, seq_len=64, min_depth=5, widths=[0.6])
LABELS = ["depth=6,width=0.6", "depth=5,width=0.6"]
PROMPT = "ROMEO: But soft, what light"


@pytest.fixture(scope="module")
def search() -> SubnetSearch:
    found, _ = search_subnets(load_model("zoo:tiny-lm"), SMALL, lambda _m: None)
    assert [shape.label() for shape, _ in found.shapes()] == LABELS
    return found


def _torch_tokens(search: SubnetSearch, label: str, steps: int) -> list[int]:
    handle = load_model("zoo:tiny-lm")
    model = copy.deepcopy(handle.module)
    extract(model, search, parse_shape(label))
    entries = CausalLMEntries(model).eval()

    def prefill(ids: np.ndarray) -> tuple[np.ndarray, ...]:
        with torch.no_grad():
            return tuple(t.numpy() for t in entries.prefill(torch.from_numpy(ids)))

    def decode(ids: np.ndarray, *cache: np.ndarray) -> tuple[np.ndarray, ...]:
        with torch.no_grad():
            return tuple(t.numpy() for t in entries.decode(torch.from_numpy(ids), *(torch.from_numpy(c) for c in cache)))

    ids = list(handle.tokenizer(PROMPT)["input_ids"])
    return greedy_generate(prefill, decode, ids, steps, 512, None)


def test_every_shape_shares_one_copy_of_the_weights_and_runs_as_its_extracted_subnet(search: SubnetSearch, tmp_path: Path) -> None:
    out = tmp_path / "all"
    result = runner.invoke(app, ["compile", "zoo:tiny-lm", "--subnet", "all", "--backend", "onnx", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    assert json.loads(result.stdout)["parity"]["ok"] is True
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["label"] for s in manifest["lm"]["shapes"]] == LABELS == list(manifest["program"]["shapes"])
    assert len(manifest["program"]["entries"]) == 4 and manifest["program"]["default_shape"] == LABELS[0]
    assert manifest["lm"]["cache"][0]["layout"][1] == "kv_heads_by_layer"
    assert {o["entry"] for o in manifest["parity"]["outputs"]} == set(manifest["program"]["entries"])
    one_copy = Path(load_model("zoo:tiny-lm").source, "model.safetensors").stat().st_size
    assert (out / "model" / "weights.bin").stat().st_size < 1.01 * one_copy
    for label in LABELS:
        ran = runner.invoke(app, ["run", str(out), "--prompt", PROMPT, "-n", "12", "--shape", label, "--json"])
        assert ran.exit_code == 0, ran.output
        got = json.loads(ran.stdout)
        assert got["shape"] == label and got["tokens"] == _torch_tokens(search, label, 12), label
    ran = runner.invoke(app, ["run", str(out), "--prompt", PROMPT, "--shape", "depth=4,width=0.6"])
    assert ran.exit_code == 2 and "not in" in ran.stderr and "depth=5,width=0.6" in ran.stderr
    default = runner.invoke(app, ["run", str(out), "--prompt", PROMPT, "-n", "12", "--json"])
    assert json.loads(default.stdout)["shape"] == LABELS[0]


@pytest.mark.arm64
def test_every_shape_runs_on_the_emulated_arm64_device(search: SubnetSearch, tmp_path: Path) -> None:
    out = tmp_path / "all-arm64"
    result = runner.invoke(app, ["compile", "zoo:tiny-lm", "--subnet", "all", "--target", "arm64", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    record = json.loads((out / "manifest.json").read_text())["backend_record"]
    assert all("shared" in entry["weight_layout"] for entry in record["entries"].values())
    one_copy = Path(load_model("zoo:tiny-lm").source, "model.safetensors").stat().st_size
    assert (out / "model" / "params.safetensors").stat().st_size < 1.01 * one_copy
    deployed = runner.invoke(app, ["deploy", str(out), "--device", "qemu-arm64", "--json"])
    assert deployed.exit_code == 0, deployed.output + deployed.stderr
    report = json.loads(deployed.stdout)
    assert report["machine"] == "aarch64" and report["parity"]["ok"] is True
    assert {o["entry"] for o in report["parity"]["outputs"]} == set(record["entries"])  # every shape's prefill and decode ran there


def test_a_latency_budget_picks_the_best_shape_that_fits_timed_over_a_stock_rpc_server(search: SubnetSearch, tmp_path: Path) -> None:
    out = tmp_path / "budget"
    with host_rpc_server() as uri:
        result = runner.invoke(app, ["compile", "zoo:tiny-lm", "--latency-budget-ms", "100000", "--device", uri, "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    budget = manifest["latency_budget"]
    decode = {label: row["decode_ms"] for label, row in budget["table"]["shapes"].items()}
    assert set(decode) == set(LABELS) and all(ms > 0 for ms in decode.values()) and budget["table"]["emulated"] is False
    scores = {shape.label(): row["score"] for shape, row in search.shapes()}
    assert budget["chosen"] == min(scores, key=scores.get)  # everything fits: the lowest calibration loss
    assert manifest["model"]["info"]["subnet"]["shape"] == {"depth": 6, "width": 0.6} and manifest["parity"]["ok"] is True
    # From the stored measurements: a budget only the fastest shape meets, then one none meets.
    fastest = min(decode, key=decode.get)
    table = ["--latency-table", str(out / "manifest.json")]
    result = runner.invoke(app, ["compile", "zoo:tiny-lm", "--latency-budget-ms", str(decode[fastest]), *table, "--dry-run", "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    assert json.loads(result.stdout)["recipe"]["subnet"] == fastest
    result = runner.invoke(app, ["compile", "zoo:tiny-lm", "--latency-budget-ms", str(decode[fastest] / 2), *table, "--dry-run"])
    assert result.exit_code == 2 and f"the fastest, {fastest}, takes {decode[fastest]:.2f} ms" in result.stderr
    for args, why in ((["--latency-budget-ms", "5"], "needs --latency-table FILE, or --device"),
                      (["--latency-budget-ms", "5", "--subnet", "depth=5,width=0.6", *table], "drop --subnet"),
                      (["--latency-budget-ms", "5", "--target", "arm64", *table], "measured for cpu/tvm, not arm64/tvm")):
        result = runner.invoke(app, ["compile", "zoo:tiny-lm", *args, "-o", str(tmp_path / "x")])
        assert result.exit_code == 2 and why in result.stderr, (args, result.stderr)
