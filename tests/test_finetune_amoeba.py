"""AmoebaLLM's one-time fine-tuning on zoo:tiny-lm: top-k gating, the merged update against
the gated mixture, extraction after merging against the tuned masked model, the command
with its checkpoint and resume, the tuned model compiled for a shape, bad input."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from edgec.cli import app
from edgec.data import calibration_segments
from edgec.finetune import finetune
from edgec.finetune.amoeba import Amoeba, AmoebaOptions, MixtureLinear, merge_for_shape
from edgec.lm import CausalLMEntries
from edgec.model import load_model
from edgec.recipe import load_recipe
from edgec.subnet import Shape
from edgec.subnet.extract import extract
from edgec.subnet.search import SearchOptions, SubnetSearch, search_subnets

runner = CliRunner()
SEARCH = SearchOptions(samples=4, seq_len=64, min_depth=3, widths=[1.0, 0.8, 0.6])
TUNING = ["finetune.steps=3", "finetune.batch=1", "finetune.seq_len=32", "finetune.checkpoint_every=1",
          "finetune.options.rank=4", "finetune.options.experts=3"]


@pytest.fixture(scope="module")
def search() -> SubnetSearch:
    found, _ = search_subnets(load_model("zoo:tiny-lm"), SEARCH, lambda _m: None)
    return found


def _planted(search: SubnetSearch) -> Amoeba:
    """The mixture with random B (a fresh one is zero) and a random router: updates differ per shape."""
    amoeba = Amoeba(copy.deepcopy(load_model("zoo:tiny-lm").module), search, AmoebaOptions(experts=3, rank=4), seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mixture in amoeba.mixtures.values():
            mixture.experts_b.normal_(0.0, 0.02, generator=generator)
    return amoeba


def test_the_router_mixes_the_top_two_experts_and_shapes_get_different_gates(search: SubnetSearch) -> None:
    amoeba = _planted(search)
    gates = [amoeba.set_shape(shape) for shape in (Shape(), Shape(4, 0.6), Shape(3, 0.8))]
    for gate in gates:
        assert int((gate > 0).sum()) == 2 and torch.isclose(gate.sum(), torch.tensor(1.0))
    assert not torch.allclose(gates[0], gates[1]) and not torch.allclose(gates[1], gates[2])


def test_the_merged_update_equals_the_gated_mixture(search: SubnetSearch) -> None:
    amoeba = _planted(search)
    amoeba.set_shape(Shape(4, 0.6))
    mixture = next(iter(amoeba.mixtures.values()))
    x = torch.randn(3, 5, mixture.in_features, generator=torch.Generator().manual_seed(2))
    merged = torch.nn.functional.linear(x, mixture.base.weight + mixture.delta())
    with torch.no_grad():
        assert torch.allclose(mixture(x), merged, atol=1e-5)
        assert (mixture(x) - mixture.base(x)).abs().max() > 1e-3  # the update is not nothing


@pytest.mark.parametrize("shape", [Shape(4, 0.6), Shape(None, 1.0)])
def test_a_merged_extracted_shape_computes_what_the_tuned_model_trained(search: SubnetSearch, shape: Shape) -> None:
    amoeba = _planted(search)
    ids = torch.tensor(calibration_segments(load_model("zoo:tiny-lm").tokenizer, "held-out", 2, 20))
    with torch.no_grad():
        want = amoeba.logits(shape, ids)
        model = amoeba.model
        merge_for_shape(model, shape, search)
        assert not any(isinstance(m, MixtureLinear) for m in model.modules()) and not hasattr(model, "edgec_amoeba")
        extract(model, search, shape)
        got = CausalLMEntries(model).eval().prefill(ids)[0]
    assert torch.allclose(got, want, atol=5e-5)


def test_tuning_resumes_from_its_checkpoint_and_compiles_a_shape(search: SubnetSearch, tmp_path: Path) -> None:
    recipe = load_recipe(None, TUNING)
    whole = tmp_path / "whole"
    record = finetune("zoo:tiny-lm", "amoeba", recipe, whole, resume=False, force=False, progress=lambda _m: None)
    assert record["loss"]["full"]["steps"] == 3 and record["loss"]["depth=3,width=0.6"]["steps"] == 3  # the smallest, every step

    def stop_at_step_two(message: str) -> None:
        if "in-place distillation: 2/3" in message:
            raise KeyboardInterrupt

    out = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        finetune("zoo:tiny-lm", "amoeba", recipe, out, resume=False, force=False, progress=stop_at_step_two)
    assert not out.exists() and (tmp_path / "stopped.checkpoint" / "progress.json").is_file()
    seen: list[str] = []
    finetune("zoo:tiny-lm", "amoeba", recipe, out, resume=True, force=False, progress=seen.append)
    assert any("resume from" in m and "step 2 of 3" in m for m in seen), seen
    first, resumed = load_file(str(whole / "amoeba.safetensors")), load_file(str(out / "amoeba.safetensors"))
    assert first.keys() == resumed.keys() and all(torch.equal(first[k], resumed[k]) for k in first)
    assert any(first[k].abs().max() > 0 for k in first if k.endswith("experts_b"))  # B moved off zero
    assert (out / "subnet" / "search.json").is_file() and (out / "model.safetensors").read_bytes() == \
        Path(load_model("zoo:tiny-lm").source, "model.safetensors").read_bytes()

    artifact = tmp_path / "artifact"
    result = runner.invoke(app, ["compile", str(out), "--subnet", "depth=4,width=0.6", "--backend", "onnx", "-o", str(artifact), "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    assert json.loads(result.stdout)["parity"]["ok"] is True
    info = json.loads((artifact / "manifest.json").read_text())["model"]["info"]
    assert info["amoeba"]["merged"]["shape"] == "depth=4,width=0.6" and info["subnet"]["shape"] == {"depth": 4, "width": 0.6}


def test_bad_amoeba_input_is_refused_before_any_work(search: SubnetSearch, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cases = [
        (["--set", "finetune.options.experts=0"], "finetune.options.experts: Input should be greater than or equal to 1"),
        (["--set", "passes=luc"], "--method amoeba tunes the dense model"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["finetune", "zoo:tiny-lm", *args, "--method", "amoeba", "-o", str(tmp_path / "out")])
        assert result.exit_code == 2 and message in result.stderr, (args, result.stderr)
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.checkpoint").exists()
    tuned = tmp_path / "tuned"
    finetune("zoo:tiny-lm", "amoeba", load_recipe(None, [*TUNING, "finetune.steps=1"]), tuned, resume=False, force=False,
             progress=lambda _m: None)
    result = runner.invoke(app, ["compile", str(tuned), "--subnet", "depth=2", "-o", str(tmp_path / "a")])
    assert result.exit_code == 2 and "depth=2: outside the search's table" in result.stderr, result.stderr
    result = runner.invoke(app, ["subnet", "search", str(tuned)])
    assert result.exit_code == 2 and "a tuned model" in result.stderr
    monkeypatch.setenv("EDGEC_CACHE_DIR", str(tmp_path / "empty-cache"))  # a model nobody searched
    result = runner.invoke(app, ["finetune", "zoo:tiny-lm", "--method", "amoeba", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "has no subnet search; run `edgec subnet search zoo:tiny-lm` first" in result.stderr
    assert not (tmp_path / "out").exists()
