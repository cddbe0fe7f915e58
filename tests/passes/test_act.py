"""act: calibrated attention in the entries, the head search, and its bad-input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from edgec.analyze import record_attention
from edgec.cli import app
from edgec.errors import BadInputError, UnsupportedError
from edgec.lm import CausalLMEntries
from edgec.model import load_model
from edgec.passes import REGISTRY
from edgec.passes.act import ActOptions, check_attention, install
from edgec.recipe import load_recipe
from edgec.sinks import SinkRule, find_sinks
from edgec.tasks import build_task, evaluate_task, torch_last_logits
from tests.conftest import SINK_POSITIONS, SINK_TOKEN, make_planted_sink_llama, planted_prompt

runner = CliRunner()


def kept_by_layer(kept: set[tuple[int, int]]) -> dict[int, list[int]]:
    by_layer: dict[int, list[int]] = {}
    for layer, head in sorted(kept):
        by_layer.setdefault(layer, []).append(head)
    return by_layer


LAYER0_ALL = {0: [0, 1, 2, 3]}


def test_planted_sinks_are_found_wherever_the_sink_token_sits() -> None:
    model = make_planted_sink_llama()
    moved = planted_prompt()
    for position in SINK_POSITIONS:
        moved[position] = moved[position + 2]
    moved[5], moved[11] = SINK_TOKEN, SINK_TOKEN
    for ids, where in ((planted_prompt(), set(SINK_POSITIONS)), (moved, {5, 11})):
        probs = record_attention(model, ids)[0][None]
        sinks, _ = find_sinks(probs, SinkRule(stat="paper"))
        for head in range(4):
            found = set(sinks[0, head, -1].nonzero().flatten().tolist())
            assert where <= found and not (set(SINK_POSITIONS) | {5, 11}) - where & found


@pytest.mark.parametrize("batch", [1, 2])
def test_decode_with_cache_equals_prefill_with_calibration(batch: int) -> None:
    """stat causal: prefill of n tokens then decode steps = prefill of the whole sequence,
    with GQA (4 query heads on 2 KV heads) and batch > 1."""
    model = make_planted_sink_llama()
    install(model, LAYER0_ALL, SinkRule(stat="causal"))
    entries = CausalLMEntries(model).eval()
    assert entries.state_heads == 4
    ids = torch.tensor([planted_prompt()] * batch)
    ids[-1, 6] = SINK_TOKEN  # the batch elements differ in where their sinks are
    with torch.no_grad():
        full_logits, *_ , full_s = entries.prefill(ids)
        logits, k, v, s = entries.prefill(ids[:, :8])
        steps = [logits[:, -1]]
        for position in range(8, ids.shape[1]):
            logits, new_k, new_v, s = entries.decode(ids[:, position : position + 1], k, v, s)
            k, v = torch.cat((k, new_k)), torch.cat((v, new_v))  # appended; s comes back whole
            steps.append(logits[:, -1])
    assert torch.allclose(torch.stack(steps[:-1], 1), full_logits[:, 7:-1], atol=1e-5)
    assert torch.allclose(steps[-1], full_logits[:, -1], atol=1e-5)
    assert torch.allclose(s, full_s, atol=1e-5)


def test_calibration_changes_the_model_and_beta_one_does_not() -> None:
    ids = torch.tensor([planted_prompt()])
    plain = make_planted_sink_llama()
    with torch.no_grad():
        reference = CausalLMEntries(plain).prefill(ids)[0]
        for beta, changes in ((0.4, True), (1.0, False)):
            model = make_planted_sink_llama()
            install(model, LAYER0_ALL, SinkRule(beta=beta, stat="paper"))
            logits = CausalLMEntries(model).prefill(ids)[0]
            assert (not torch.allclose(logits, reference, atol=1e-4)) is changes


def test_paper_statistic_leaves_decode_plain_and_carries_no_state() -> None:
    model = make_planted_sink_llama()
    install(model, LAYER0_ALL, SinkRule(stat="paper"))
    entries = CausalLMEntries(model).eval()
    plain = CausalLMEntries(make_planted_sink_llama()).eval()
    ids = torch.tensor([planted_prompt()])
    with torch.no_grad():
        outputs = entries.prefill(ids)
        assert len(outputs) == 3
        _, k, v = plain.prefill(ids)
        step = torch.tensor([[SINK_TOKEN]])
        assert torch.equal(entries.decode(step, k, v)[0], plain.decode(step, k, v)[0])


@pytest.mark.parametrize(
    "setting,message",
    [
        ("act.beta=0", "beta"),
        ("act.beta=1.5", "beta"),
        ("act.threshold_mode=relative", "threshold_mode"),
        ("act.search.tasks=[trivia]", "tasks"),
    ],
)
def test_bad_options_are_refused_when_the_recipe_loads(setting: str, message: str) -> None:
    with pytest.raises(BadInputError, match=message):
        load_recipe(Path("recipes/act.yaml"), [setting], options_for=lambda name: REGISTRY[name].Options)


def test_a_head_outside_the_model_is_refused(planted_sink_llama_dir: Path, tmp_path: Path) -> None:
    for heads, text in (("{0: [4]}", "layer 0 head 4 is outside the model (heads 0-3)"), ("{2: [0]}", "layer 2 is outside the model (layers 0-1)")):
        result = runner.invoke(
            app, ["compile", str(planted_sink_llama_dir), "--recipe", "recipes/act.yaml", "--set", f"act.heads={heads}", "-o", str(tmp_path / "x")]
        )
        assert result.exit_code == 2 and text in result.stderr
        assert "Traceback" not in result.output and not (tmp_path / "x").exists()


def test_a_model_without_attention_is_refused(tmp_path: Path) -> None:
    onnx_path = tmp_path / "mlp.onnx"
    torch.onnx.export(torch.nn.Sequential(torch.nn.Linear(4, 4)), (torch.zeros(1, 4),), str(onnx_path), dynamo=False)
    result = runner.invoke(app, ["compile", str(onnx_path), "--recipe", "recipes/act.yaml", "-o", str(tmp_path / "y")])
    assert result.exit_code == 3 and "pass act does not apply" in result.stderr and "accepts: causal-lm" in result.stderr


def test_fused_attention_is_named_with_the_reason(planted_sink_llama_dir: Path) -> None:
    handle = load_model(str(planted_sink_llama_dir))
    assert handle.module is not None
    del handle.module.model.layers[1].self_attn.q_proj
    with pytest.raises(UnsupportedError, match=r"model.layers.1.self_attn \(LlamaAttention\) has no separate q_proj"):
        check_attention(handle)


def test_search_keeps_only_heads_that_help_and_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEC_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "act-tiny"
    sets = ["act.search.samples=12", "act.search.candidates=6", "act.search.max_heads=3", "evaluate.tokens=0"]
    args = ["compile", "zoo:tiny-lm", "--recipe", "recipes/act.yaml", "--backend", "onnx", "-o", str(out), "--json"]
    result = runner.invoke(app, [*args, *[x for s in sets for x in ("--set", s)]])
    assert result.exit_code == 0, result.output + result.stderr
    record = json.loads(result.stdout)["passes"][0]["record"]
    search = record["search"]
    assert search["source"] == "measured" and search["seed"] == 0 and search["candidates"] == 6
    assert len(search["per_head"]) == 6
    helpful = {(r["layer"], r["head"]) for r in search["per_head"] if r["helps"]}
    kept = {(int(layer), head) for layer, heads in search["heads"].items() for head in heads}
    assert kept <= helpful and len(kept) <= 3
    for row in search["per_head"]:
        better = (row["accuracy"], -row["label_nll"]) > (search["baseline"]["accuracy"], -search["baseline"]["label_nll"])
        assert row["helps"] == better
    # Deterministic (committed checkpoint, seed 0): this search keeps heads, so the
    # calibrated score must beat the baseline it was chosen against.
    assert kept, search["per_head"]
    calibrated = (search["calibrated"]["accuracy"], -search["calibrated"]["label_nll"])
    baseline = (search["baseline"]["accuracy"], -search["baseline"]["label_nll"])
    assert calibrated > baseline
    assert record["calibrated_heads"] == len(kept)
    # The search's own cache (the pass cache off, or the pass would not run at all).
    monkeypatch.setenv("EDGEC_PASS_CACHE", "0")
    again = runner.invoke(app, [*args, "--force", *[x for s in sets for x in ("--set", s)]])
    assert json.loads(again.stdout)["passes"][0]["record"]["search"]["source"] == "cache"
    # The artifact's test-split score, against torch with and without the kept heads.
    evaluated = runner.invoke(app, ["eval", str(out), "--task", "wordnet", "--samples", "8", "--json"])
    assert evaluated.exit_code == 0, evaluated.stderr
    result = json.loads(evaluated.stdout)
    assert result["n"] == 8 and result["task"] == "wordnet"
    handle = load_model("zoo:tiny-lm")
    assert handle.module is not None
    test_split = build_task("wordnet", 0, 0, 8)
    plain = evaluate_task(torch_last_logits(handle.module), handle.tokenizer, test_split.test, test_split.labels)
    install(handle.module, kept_by_layer(kept), SinkRule(**record["rule"]))
    torch_act = evaluate_task(torch_last_logits(handle.module), handle.tokenizer, test_split.test, test_split.labels)
    assert result["accuracy"] == pytest.approx(torch_act.accuracy) and result["label_nll"] == pytest.approx(torch_act.label_nll, abs=2e-4)
    assert abs(torch_act.label_nll - plain.label_nll) > 1e-3  # so the match above tells calibrated from plain


def test_act_options_default_thresholds() -> None:
    assert ActOptions().rule().threshold == 0.1
    assert ActOptions(threshold_mode="alpha").rule().threshold == 5.0


def test_report_shows_the_heads_and_the_search_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEC_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "act"
    sets = ["act.search.samples=8", "act.search.candidates=3", "act.search.max_heads=2"]
    args = ["compile", "zoo:tiny-lm", "--recipe", "recipes/act.yaml", "--backend", "onnx", "-o", str(out)]
    assert runner.invoke(app, [*args, *[x for s in sets for x in ("--set", s)]]).exit_code == 0
    written = runner.invoke(app, ["report", str(out), "--json"])
    page = (Path(json.loads(written.stdout)["report"]) / "report.html").read_text()
    assert "Attention calibration (act)" in page and "moved mass" in page and page.count("<tr>") >= 3 + 1 + 3
