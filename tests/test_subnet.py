"""AmoebaLLM subnets on zoo:tiny-lm (6 layers, 8 query / 4 KV heads): the depth DP against
exhaustive search, nested width masks, compensation biases, extraction against the masked
full model, the ragged KV cache, the cached and resumable search, and bad input."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from edgec.architectures import architecture_of
from edgec.cli import app
from edgec.data import calibration_segments
from edgec.errors import BadInputError
from edgec.lm import CausalLMEntries
from edgec.model import ModelHandle, load_model
from edgec.subnet import Shape, parse_shape
from edgec.subnet.depth import dp_removals, exhaustive_removals, kept_layers
from edgec.subnet.extract import extract
from edgec.subnet.nested import permuted, shape_view, unit_order
from edgec.subnet.search import SCORES_FILE, Scorer, SearchOptions, SubnetSearch, search_subnets, shape_parameters
from edgec.subnet.width import channel_parameters, group_parameters, layer_modules, masked, measure_width, width_masks

runner = CliRunner()
OPTIONS = SearchOptions(samples=4, seq_len=64, min_depth=3, widths=[1.0, 0.8, 0.6])


@pytest.fixture(scope="module")
def tiny() -> ModelHandle:
    return load_model("zoo:tiny-lm")


@pytest.fixture(scope="module")
def search(tiny: ModelHandle) -> SubnetSearch:
    found, _ = search_subnets(tiny, OPTIONS, lambda _m: None)
    return found


def _batches(tiny: ModelHandle) -> list[torch.Tensor]:
    segments = calibration_segments(tiny.tokenizer, "train", OPTIONS.samples, OPTIONS.seq_len)
    return list(torch.tensor(segments).split(2))


def test_dp_depth_masks_match_exhaustive_search_on_six_layers(tiny: ModelHandle, tmp_path: Path) -> None:
    entries = CausalLMEntries(tiny.module).eval()
    scorer = Scorer(entries, _batches(tiny), tmp_path / "memo.json", "test")

    def score(removed: tuple[int, ...]) -> float:
        return scorer(kept_layers(6, removed))

    dp = dp_removals(6, 5, score)
    dp_evaluations = scorer.evaluations
    exhaustive = exhaustive_removals(6, 5, score)
    assert dp == exhaustive
    assert all(5 not in removed for removed in dp.values())  # the last layer stays
    assert dp_evaluations < scorer.evaluations == 2**5  # exhaustive needed every subset of the 5 candidates


def test_dp_is_exact_when_layer_costs_add_up() -> None:
    # With additive costs every prefix of the optimum is optimal, so the DP must find it
    # (a wrong branch or index shows here on any seed).
    for seed in range(5):
        costs = torch.rand(8, generator=torch.Generator().manual_seed(seed)).tolist()

        def score(removed: tuple[int, ...]) -> float:
            return sum(costs[layer] for layer in removed)

        best = {m: tuple(sorted(sorted(range(7), key=lambda layer: costs[layer])[:m])) for m in range(6)}
        assert dp_removals(8, 5, score) == best == exhaustive_removals(8, 5, score)


def test_width_masks_nest_and_fit_the_budget(tiny: ModelHandle, search: SubnetSearch) -> None:
    arch = architecture_of(tiny.module)
    assert search.stats is not None
    layers = search.layers(4)
    group, channel = group_parameters(arch, 256, 0), channel_parameters(arch, 256)
    total = len(layers) * (4 * group + 688 * channel)
    previous = None
    for ratio in (0.95, 0.8, 0.65, 0.5, 0.35):
        masks = width_masks(search.stats, arch, 256, layers, ratio)
        kept = sum(len(masks[layer].groups) * group + len(masks[layer].channels) * channel for layer in layers)
        # The removed prefix of the ranking fits (1 - ratio), and the next unit would not have.
        assert ratio * total <= kept < ratio * total + group
        if previous is not None:
            for layer in layers:
                assert set(masks[layer].groups) <= set(previous[layer].groups)
                assert set(masks[layer].channels) <= set(previous[layer].channels)
        assert all(masks[layer].groups and masks[layer].channels for layer in layers)
        previous = masks
    assert previous is not None and sum(len(m.groups) for m in previous.values()) < 4 * len(layers)


def test_compensation_bias_keeps_the_mean_output_on_calibration_data(tiny: ModelHandle) -> None:
    entries = CausalLMEntries(copy.deepcopy(tiny.module)).eval()
    batches = _batches(tiny)
    stats = measure_width(entries, batches)
    arch = entries.arch
    masks = width_masks(stats, arch, 256, list(range(6)), 0.6)
    seen: dict[str, list[torch.Tensor]] = {"dense": [], "pruned": []}
    modules = layer_modules(entries.layers[2], arch)
    hook = modules.mlp_out.register_forward_hook(lambda _m, _i, out: seen["dense"].append(out.detach().reshape(-1, 256)))
    with torch.no_grad():
        for batch in batches:
            entries.logits_through(batch, list(range(6)))
        hook.remove()
        inputs: list[torch.Tensor] = []
        hook = modules.mlp_out.register_forward_pre_hook(lambda _m, i: inputs.append(i[0].detach()))
        for batch in batches:
            entries.logits_through(batch, list(range(6)))
        hook.remove()
        from edgec.subnet.extract import keep_columns

        kept = torch.tensor(masks[2].channels)
        assert len(kept) < modules.mlp_out.in_features
        pruned = keep_columns(modules.mlp_out, kept, stats.mlp_mean[2])
        seen["pruned"] = [pruned(x[..., kept]).reshape(-1, 256) for x in inputs]
        uncompensated = torch.nn.functional.linear(torch.cat([x[..., kept] for x in inputs]).reshape(-1, len(kept)),
                                                   modules.mlp_out.weight[:, kept])
    dense_mean, pruned_mean = torch.cat(seen["dense"]).mean(0), torch.cat(seen["pruned"]).mean(0)
    assert torch.allclose(pruned_mean, dense_mean, atol=1e-5)
    assert (uncompensated.mean(0) - dense_mean).abs().max() > 100 * (pruned_mean - dense_mean).abs().max()


@pytest.mark.parametrize("shape", [Shape(4, 0.6), Shape(5, 1.0), Shape(None, 0.8)])
def test_extracted_subnet_logits_equal_the_masked_full_model(tiny: ModelHandle, search: SubnetSearch, shape: Shape) -> None:
    ids = torch.tensor(calibration_segments(tiny.tokenizer, "held-out", 2, 24))
    full = CausalLMEntries(tiny.module).eval()
    layers = search.layers(shape.depth)
    widths = search.widths_of(full.arch, 256, shape)
    with torch.no_grad():
        if widths is None:
            want = full.logits_through(ids, layers)
        else:
            assert search.stats is not None
            with masked(full, search.stats, widths):
                want = full.logits_through(ids, layers)
        sub_model = copy.deepcopy(tiny.module)
        record = extract(sub_model, search, shape)
        sub = CausalLMEntries(sub_model).eval()
        got = sub.logits_through(ids, list(range(len(layers))))
        prefill = sub.prefill(ids)[0]
        hf = sub_model(ids).logits  # passes calibrate through the HF forward: it must run the subnet too
    assert torch.allclose(got, want, atol=2e-5, rtol=0)
    assert torch.equal(prefill, got)
    assert torch.allclose(hf, got, atol=1e-4, rtol=0)
    assert record["parameters"] == sum(p.numel() for p in sub_model.parameters()) < sum(p.numel() for p in tiny.module.parameters())
    assert record["layers"] == layers and sub.arch.num_layers == len(layers)
    if widths is not None:
        assert record["kv_heads"] == [len(widths[layer].groups) for layer in layers]
        assert max(record["kv_heads"]) <= 4 and sum(record["kv_heads"]) < 4 * len(layers)


@pytest.mark.parametrize("appended", [True, False], ids=["appended", "concatenated"])
def test_ragged_kv_cache_decodes_like_a_longer_prefill(tiny: ModelHandle, search: SubnetSearch, appended: bool) -> None:
    sub_model = copy.deepcopy(tiny.module)
    extract(sub_model, search, Shape(4, 0.6))
    sub = CausalLMEntries(sub_model, appended_cache=appended).eval()
    assert sub.arch.ragged_kv
    ids = torch.tensor(calibration_segments(tiny.tokenizer, "held-out", 1, 13))
    with torch.no_grad():
        whole = sub.prefill(ids)
        logits, k, v = sub.prefill(ids[:, :-1])
        step = sub.decode(ids[:, -1:], k, v)
    heads = sum(sub.arch.layer_kv_heads)
    assert torch.allclose(step[0][:, -1], whole[0][:, -1], atol=1e-4)
    if appended:  # position-major, and decode returns only the position it added
        assert k.shape == (12, 1, heads, 32) and step[1].shape == (1, 1, heads, 32)
        assert torch.allclose(step[1], whole[1][-1:], atol=1e-5)
    else:
        assert k.shape == (1, heads, 12, 32) and step[1].shape == (1, heads, 13, 32)
        assert torch.allclose(step[1], whole[1], atol=1e-5)


def test_search_is_cached_per_model_and_resumes_from_its_scores(tiny: ModelHandle, search: SubnetSearch) -> None:
    again, source = search_subnets(tiny, OPTIONS, lambda _m: None)
    assert source == "cache" and again.record == search.record
    # An interrupted search: the table's scores lost, the depth DP's kept.
    memo = search.directory / SCORES_FILE
    saved = json.loads(memo.read_text())
    kept = {name: value for name, value in saved["scores"].items() if "width" not in name}
    memo.write_text(json.dumps({"key": saved["key"], "scores": kept}))
    (search.directory / "search.json").unlink()
    resumed, source = search_subnets(tiny, OPTIONS, lambda _m: None)
    assert source == "resumed"
    assert resumed.record["resumed_scores"] == len(kept)
    assert resumed.record["evaluations"] == len(saved["scores"]) - len(kept)
    assert resumed.record["table"] == search.record["table"]


def test_search_command_prints_the_table_as_json_and_plots(tmp_path: Path) -> None:
    plot = tmp_path / "subnets.png"
    result = runner.invoke(app, ["subnet", "search", "zoo:tiny-lm", "--samples", "4", "--seq-len", "64", "--min-depth", "3",
                                 "--widths", "1,0.8,0.6", "--json", "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert [d["depth"] for d in record["depths"]] == [6, 5, 4, 3]
    assert len(record["table"]) == 12 and record["table"][0]["fraction"] == 1.0
    scores = {(r["depth"], r["width"]): r["score"] for r in record["table"]}
    assert scores[(3, 0.6)] > scores[(6, 1.0)]
    assert plot.stat().st_size > 10_000


def test_parse_shape_refuses_what_is_not_a_shape() -> None:
    assert parse_shape("depth=4,width=0.75") == Shape(4, 0.75)
    assert parse_shape("width=0.5") == Shape(None, 0.5)
    for bad in ("depth=0", "width=1.5", "width=0", "depth=four", "height=3", "depth=2,depth=3"):
        with pytest.raises(BadInputError, match="--subnet"):
            parse_shape(bad)


def test_compile_subnet_refuses_a_model_without_search_and_a_shape_outside_the_table(
    search: SubnetSearch, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    result = runner.invoke(app, ["compile", str(tiny_llama_dir), "--subnet", "depth=1", "-o", str(tmp_path / "a")])
    assert result.exit_code == 2 and "has no subnet search; run `edgec subnet search" in result.stderr
    for shape, why in (("depth=2", "outside the search's table (depths 3-6)"), ("width=0.7", "not in the search's table")):
        result = runner.invoke(app, ["compile", "zoo:tiny-lm", "--subnet", shape, "-o", str(tmp_path / "b")])
        assert result.exit_code == 2 and why in result.stderr, result.stderr
        assert "Traceback" not in result.output + result.stderr and not (tmp_path / "b").exists()
    result = runner.invoke(app, ["compile", "zoo:tiny-lm", "--subnet", "depth=3,width=2", "--dry-run"])
    assert result.exit_code == 2 and "width" in result.stderr


def test_subnet_compiles_with_a_ragged_cache_and_passes_parity(search: SubnetSearch, tmp_path: Path) -> None:
    out = tmp_path / "sub"
    result = runner.invoke(app, ["compile", "zoo:tiny-lm", "--subnet", "depth=4,width=0.6", "--backend", "onnx",
                                 "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    summary = json.loads(result.stdout)
    assert summary["parity"]["ok"] is True and summary["parity"]["generation"]["matched"] == 32
    manifest = json.loads((out / "manifest.json").read_text())
    subnet = manifest["model"]["info"]["subnet"]
    assert subnet["layers"] == search.layers(4) and subnet["shape"] == {"depth": 4, "width": 0.6}
    assert manifest["lm"]["num_layers"] == 4 and manifest["lm"]["layer_kv_heads"] == subnet["kv_heads"]
    cache = manifest["lm"]["cache"][0]
    assert cache["layout"][1] == "kv_heads_by_layer" and cache["shape"][1] == sum(subnet["kv_heads"])
    run = runner.invoke(app, ["run", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "8", "--json"])
    assert run.exit_code == 0, run.output
    assert json.loads(run.stdout)["new_tokens"] == 8


def test_permuted_units_make_every_shape_a_prefix_and_views_share_the_weights(tiny: ModelHandle, search: SubnetSearch) -> None:
    assert search.stats is not None
    arch = architecture_of(tiny.module)
    for shape, _ in search.shapes():
        widths = search.widths_of(arch, 256, shape)
        for layer, width in (widths or {}).items():
            for kept, scores in ((width.groups, search.stats.group_z[layer]), (width.channels, search.stats.channel_z[layer])):
                assert set(kept) == set(unit_order(scores)[: len(kept)]), (shape, layer)
    nested, stats = permuted(tiny.module, search.stats)
    ids = torch.tensor(calibration_segments(tiny.tokenizer, "held-out", 2, 24))
    shared = {id(p) for p in nested.parameters()}
    with torch.no_grad():
        assert torch.allclose(CausalLMEntries(nested).eval().prefill(ids)[0], CausalLMEntries(tiny.module).eval().prefill(ids)[0], atol=2e-5)
        for shape in (Shape(4, 0.6), Shape(3, 1.0)):
            view = shape_view(nested, stats, search, shape)
            assert {id(p) for p in view.parameters()} <= shared  # nothing copied: slices of the same tensors
            reference = copy.deepcopy(tiny.module)
            extract(reference, search, shape)
            want = CausalLMEntries(reference).eval().prefill(ids)[0]
            assert torch.allclose(CausalLMEntries(view).eval().prefill(ids)[0], want, atol=2e-5)


@pytest.mark.slow
@pytest.mark.compile
def test_smollm2_search_extracts_a_shape_exactly_and_compiles_it_with_parity(tmp_path: Path) -> None:
    """SmolLM2-135M: 9 query heads in 3 KV groups, 30 layers, tied embeddings; a small search
    (few segments, depths 30-28) so the tier stays minutes long."""
    result = runner.invoke(app, ["subnet", "search", "zoo:smollm2-135m", "--samples", "2", "--seq-len", "32", "--min-depth", "28",
                                 "--widths", "1,0.75", "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    record = json.loads(result.stdout)
    assert [d["depth"] for d in record["depths"]] == [30, 29, 28]
    assert all(d["layers"][-1] == 29 for d in record["depths"])  # the last layer is always kept
    fractions = {(r["depth"], r["width"]): r["fraction"] for r in record["table"]}
    assert len(fractions) == 6 and fractions[(30, 1.0)] == 1.0 and fractions[(28, 0.75)] < fractions[(28, 1.0)] < fractions[(29, 1.0)]

    handle = load_model("zoo:smollm2-135m")
    found, source = search_subnets(handle, SearchOptions(samples=2, seq_len=32, min_depth=28, widths=[1.0, 0.75]), lambda _m: None)
    assert source == "cache" and found.record["table"] == record["table"]
    shape = Shape(28, 0.75)
    ids = torch.tensor(calibration_segments(handle.tokenizer, "held-out", 1, 24))
    full = CausalLMEntries(handle.module).eval()
    layers = found.layers(28)
    widths = found.widths_of(full.arch, int(handle.module.config.hidden_size), shape)
    assert widths is not None and found.stats is not None
    with torch.no_grad():
        with masked(full, found.stats, widths):
            want = full.logits_through(ids, layers)
        dense = full.logits_through(ids, list(range(30)))
        sub_model = copy.deepcopy(handle.module)
        extracted = extract(sub_model, found, shape)
        got = CausalLMEntries(sub_model).eval().prefill(ids)[0]
    # Logits of order 10 after 28 layers whose sliced matmuls sum in another order than the masked
    # full ones (measured 3e-4); the tolerance still tells the subnet from the full model.
    assert torch.allclose(got, want, atol=2e-3, rtol=0), (got - want).abs().max()
    assert (dense - want).abs().max() > 100 * 2e-3
    assert max(extracted["kv_heads"]) <= 3 and sum(extracted["kv_heads"]) < 3 * 28

    out = tmp_path / "smollm2-d28w75"
    result = runner.invoke(app, ["compile", "zoo:smollm2-135m", "--subnet", "depth=28,width=0.75", "--backend", "onnx",
                                 "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    summary = json.loads(result.stdout)
    assert summary["parity"]["ok"] is True, summary["parity"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["lm"]["num_layers"] == 28 and manifest["lm"]["layer_kv_heads"] == extracted["kv_heads"]
    assert manifest["model"]["info"]["subnet"]["parameters"] == extracted["parameters"]
