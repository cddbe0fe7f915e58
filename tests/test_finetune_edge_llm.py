"""Edge-LLM adaptive layer tuning: windows, the forward stopping at the exit, exit heads
saved and reloaded, voting against a numpy reference, checkpoints, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from edgec.cli import app
from edgec.errors import BadInputError
from edgec.exits import describe_exits, exit_layers, exits_of, vote
from edgec.finetune import finetune
from edgec.finetune.edge_llm import EdgeLlmOptions, EdgeLlmTuner, stages
from edgec.lm import CausalLMEntries
from edgec.model import load_model
from edgec.recipe import Recipe, load_recipe
from tests.conftest import CHEAP_LUC, TINY_CONFIG, edge_llm_tuned, make_tiny_llama

runner = CliRunner()


def _four_layer_tuner(stride: int = 2) -> EdgeLlmTuner:
    model = make_tiny_llama()
    model.config.num_hidden_layers = 4
    model.model.layers.extend(make_tiny_llama(seed=1).model.layers)  # 2 + 2 layers
    for index, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = index
    return EdgeLlmTuner(model, EdgeLlmOptions(stride=stride, rank=4, alpha=8), seed=0)


def _batch() -> torch.Tensor:
    return torch.randint(0, TINY_CONFIG["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(3))


def test_exits_every_stride_layers_and_always_the_last() -> None:
    assert exit_layers(6, 2) == [1, 3, 5] and exit_layers(6, 4) == [3, 5] and exit_layers(6, 6) == [5]
    assert [s.window for s in stages(6, 4)] == [(0, 1, 2, 3), (4, 5)]
    assert "the last window has 2 layers (stride 4 does not divide 6)" in describe_exits(6, 4)
    with pytest.raises(BadInputError, match="stride 7: exits go every 1 to 6 layers"):
        exit_layers(6, 7)


def test_only_the_windows_adapters_and_its_exit_head_get_gradients() -> None:
    tuner = _four_layer_tuner()
    every = {name: p for stage in tuner.stages for name, p in tuner.trainable(stage).items()}
    assert len(every) == 4 * 7 * 2 + 2  # 7 adapted linears a layer, A and B; one exit head's down and up
    for stage in tuner.stages:
        tuner.set_trainable(stage)
        tuner.model.zero_grad(set_to_none=True)
        tuner.loss(stage, _batch()).backward()
        got = {name for name, p in every.items() if p.grad is not None}
        assert got == set(tuner.trainable(stage)), stage
        # B starts at zero, so A's first gradient is zero; B's (and the head's up) are not.
        assert all(bool(every[n].grad.abs().sum() > 0) for n in got if n.endswith(("lora_b", ".up")))
        assert all(p.grad is None for n, p in tuner.model.named_parameters() if "lora_" not in n and ".heads." not in n)


def test_the_forward_stops_at_the_exit_and_runs_below_the_window_without_autograd() -> None:
    tuner = _four_layer_tuner()
    ran: list[tuple[int, bool]] = []
    # The entries call each layer's submodules (the decoder layer's own forward is not used): hook its MLP.
    hooks = [layer.mlp.register_forward_hook(lambda m, a, o, i=i: ran.append((i, torch.is_grad_enabled())))
             for i, layer in enumerate(tuner.entries.layers)]
    first = tuner.stages[0]
    tuner.set_trainable(first)
    tuner.loss(first, _batch())
    assert ran == [(0, True), (1, True)]  # exit after layer 1: layers 2 and 3 never run
    ran.clear()
    tuner.loss(tuner.stages[1], _batch())
    assert ran == [(0, False), (1, False), (2, True), (3, True)]
    for hook in hooks:
        hook.remove()


def test_voting_is_the_renormalised_max_of_the_exits_softmaxes() -> None:
    # Planted: exit 0 is sure of token 2, exit 1 leans to token 5, exit 2 is flat.
    logits = np.zeros((3, 1, 2, 8), dtype=np.float32)
    logits[0, 0, :, 2] = 6.0
    logits[1, 0, :, 5] = 2.0
    logits[1, 0, 1, 5] = 9.0  # at the second position exit 1 is surer than exit 0
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    best = probs.max(axis=0)
    expected = best / best.sum(-1, keepdims=True)
    voted = vote(torch.from_numpy(logits)).numpy()
    np.testing.assert_allclose(np.exp(voted), expected, rtol=1e-5, atol=1e-7)
    assert list(np.argmax(voted, -1)[0]) == [2, 5] == list(np.argmax(expected, -1)[0])
    # Finite where plain probabilities underflow (logit gaps of 300).
    wide = torch.tensor([[[0.0, 300.0]], [[300.0, 0.0]]])
    assert bool(torch.isfinite(vote(wide)).all())


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return edge_llm_tuned(tmp_path_factory.mktemp("edge-llm"))


def test_exit_heads_are_saved_and_reloaded_and_the_reloaded_model_votes(tuned: Path) -> None:
    record = json.loads((tuned / "finetune.json").read_text())
    assert record["exits"] == [2, 5] and record["windows"] == [[0, 1, 2], [3, 4, 5]]
    handle = load_model(str(tuned))
    heads = exits_of(handle.module)
    assert heads is not None and heads.layers == [2, 5] and list(heads.heads) == ["2"]
    from safetensors.torch import load_file

    stored = load_file(str(tuned / "exits.safetensors"))
    assert torch.equal(heads.heads["2"].up, stored["exit.2.up"]) and bool(stored["exit.2.up"].abs().sum() > 0)
    entries = CausalLMEntries(handle.module).eval()
    ids = torch.arange(5, 25).reshape(1, -1)
    with torch.no_grad():
        outputs = entries.prefill(ids)
        exit_logits = outputs[-1]
        assert exit_logits.shape == (2, 1, 20, 4096)
        torch.testing.assert_close(outputs[0], vote(exit_logits))
        torch.testing.assert_close(exit_logits[0], entries.exit_forward(ids, 2))
    # The merged adapters changed the weights the exits read.
    base = load_model("zoo:tiny-lm").module
    assert not torch.equal(base.model.layers[0].self_attn.q_proj.weight, handle.module.model.layers[0].self_attn.q_proj.weight)


def test_a_compressed_model_keeps_its_packed_weights_and_gets_adapters_on_top(tmp_path: Path) -> None:
    from edgec.finetune.lora import LoraLinear
    from edgec.packing import PackedLinear

    tuned = edge_llm_tuned(tmp_path, recipe=CHEAP_LUC)
    assert (tuned / "passes" / "record.json").is_file() and (tuned / "adapters.safetensors").is_file()
    handle = load_model(str(tuned))
    q_proj = handle.module.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, LoraLinear) and isinstance(q_proj.base, PackedLinear) and bool(q_proj.lora_b.abs().sum() > 0)
    assert [p["name"] for p in handle.info["applied_passes"]] == ["luc"]
    # The packed weights are LUC's own, untouched by tuning: the same as a fresh LUC run's.
    from edgec.finetune import run_recipe_passes
    from edgec.passes import options_for

    (tmp_path / "luc.yaml").write_text(CHEAP_LUC)
    fresh = load_model("zoo:tiny-lm")
    run_recipe_passes(fresh, load_recipe(tmp_path / "luc.yaml", [], options_for), lambda _m: None)
    assert torch.equal(fresh.module.model.layers[0].self_attn.q_proj.plane0, q_proj.base.plane0)
    # The tuned model differs from the compressed one only through its adapters and exits.
    entries = CausalLMEntries(handle.module).eval()
    ids = torch.arange(5, 25).reshape(1, -1)
    with torch.no_grad():
        tuned_logits = entries.exit_forward(ids, 5)
        for layer in handle.module.model.layers:
            for module in layer.modules():
                if isinstance(module, LoraLinear):
                    module.lora_b.zero_()
        torch.testing.assert_close(entries.exit_forward(ids, 5), CausalLMEntries(fresh.module).prefill(ids)[0])
    assert not torch.allclose(tuned_logits, entries.exit_forward(ids, 5))


def test_voting_exits_are_chosen_by_the_recipe_and_refused_on_a_model_without_exits(tuned: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["compile", str(tuned), "--set", "voting.exits=[4]", "--dry-run"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["compile", str(tuned), "--set", "voting.exits=[4]", "-o", str(tmp_path / "a")])
    assert result.exit_code == 2 and "voting.exits [4]: this model's exits are after layers [2, 5]" in result.stderr
    result = runner.invoke(app, ["compile", "zoo:tiny-lm", "--set", "voting.exits=[5]", "-o", str(tmp_path / "b")])
    assert result.exit_code == 2 and "needs a model with exit heads" in result.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_stopped_run_resumes_from_its_checkpoint_to_the_same_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEC_CACHE_DIR", str(tmp_path / "cache"))
    sets = ["finetune.steps=3", "finetune.batch=1", "finetune.seq_len=16", "finetune.options.stride=3", "finetune.checkpoint_every=1"]
    recipe = load_recipe(None, sets)
    finetune("zoo:tiny-lm", "edge-llm", recipe, tmp_path / "whole", resume=False, force=False, progress=lambda _m: None)

    def stop_in_second_exit(message: str) -> None:
        if "exit after layer 5" in message and "2/3" in message:
            raise KeyboardInterrupt

    out = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        finetune("zoo:tiny-lm", "edge-llm", recipe, out, resume=False, force=False, progress=stop_in_second_exit)
    assert not out.exists() and (tmp_path / "stopped.checkpoint" / "progress.json").is_file()
    with pytest.raises(BadInputError, match="add --resume to continue it"):
        finetune("zoo:tiny-lm", "edge-llm", recipe, out, resume=False, force=False, progress=lambda _m: None)
    seen: list[str] = []
    finetune("zoo:tiny-lm", "edge-llm", recipe, out, resume=True, force=False, progress=seen.append)
    assert any("resume from" in m and "exit 5, step 2" in m for m in seen), seen
    assert not (tmp_path / "stopped.checkpoint").exists()
    from safetensors.torch import load_file

    for name in ("exits.safetensors", "model.safetensors"):
        whole, resumed = load_file(str(tmp_path / "whole" / name)), load_file(str(out / name))
        assert all(torch.equal(whole[k], resumed[k]) for k in whole), name


def test_bad_settings_are_refused_before_any_work(tmp_path: Path) -> None:
    cases = [
        (["--set", "finetune.options.stride=9"], "stride 9: exits go every 1 to 6 layers"),
        (["--set", "finetune.options.rank=512"], "rank 512 is larger than the model's hidden size 256"),
        (["--set", "finetune.options.strides=2"], "finetune.options.strides: Extra inputs are not permitted"),
        (["--set", "finetune.data=held-out"], "perplexity is measured on that split"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["finetune", "zoo:tiny-lm", "--method", "edge-llm", "-o", str(tmp_path / "out"), *args])
        assert result.exit_code == 2 and message in result.stderr, (args, result.stderr)
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.checkpoint").exists()
    # Refused before a compressing recipe's passes run (they can take minutes).
    (tmp_path / "luc.yaml").write_text(CHEAP_LUC)
    result = runner.invoke(app, ["finetune", "zoo:tiny-lm", "--method", "edge-llm", "-r", str(tmp_path / "luc.yaml"), "-o",
                                 str(tmp_path / "out"), "--set", "finetune.options.rank=200"])
    assert result.exit_code == 2 and "rank 200 is larger than self_attn.k_proj (256 -> 128)" in result.stderr, result.stderr
    assert "luc" not in result.stderr
    result = runner.invoke(app, ["finetune", "zoo:tiny-lm", "--method", "sparsegpt", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "--method sparsegpt: unknown; edgec fine-tunes with edge-llm, amoeba" in result.stderr


def test_a_rank_wider_than_a_layer_is_refused() -> None:
    model = make_tiny_llama()
    with pytest.raises(BadInputError, match="rank 64 is larger than"):
        EdgeLlmTuner(model, EdgeLlmOptions(stride=1, rank=64), seed=0)
    assert Recipe().finetune.options == {}
