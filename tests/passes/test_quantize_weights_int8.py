"""quantize-weights-int8: structure (modules, bytes), numerics against fp32 torch, bad input."""

from pathlib import Path

import pytest
import torch

from edgec.errors import BadInputError
from edgec.lm import CausalLMEntries
from edgec.model import FAMILY_CAUSAL_LM, ModelHandle
from edgec.passes.quantize_weights_int8 import (
    Int8Embedding,
    Int8Linear,
    QuantizeWeightsInt8,
    QuantizeWeightsInt8Options,
    dequantize_rows,
    quantize_rows,
)
from edgec.pipeline import PassContext
from edgec.recipe import LayerOverride, Recipe
from tests.conftest import make_tiny_llama


def handle_of(model: torch.nn.Module) -> ModelHandle:
    return ModelHandle("tiny", FAMILY_CAUSAL_LM, "LlamaForCausalLM", Path("."), "0" * 64, module=model)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return CausalLMEntries(model).prefill(ids)[0]


def test_round_trip_error_is_within_half_a_step() -> None:
    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    q, scale = quantize_rows(weight, group_size=16)
    assert q.dtype == torch.int8 and scale.shape == (8, 4)
    step = scale.repeat_interleave(16, dim=1)
    assert bool(((dequantize_rows(q, scale) - weight).abs() <= step / 2 + 1e-7).all())


def test_pass_quantizes_every_linear_and_the_tied_table_once() -> None:
    model = make_tiny_llama()
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(2))
    before = logits(model, ids)
    result = QuantizeWeightsInt8(QuantizeWeightsInt8Options(), []).run(handle_of(model), PassContext(Recipe()))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    quantized = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert linears == [] and len(quantized) == 2 * 7 + 1
    assert isinstance(model.model.embed_tokens, Int8Embedding)
    assert model.lm_head.qweight.data_ptr() == model.model.embed_tokens.qweight.data_ptr()
    assert result.record["weight_bytes_after"] < 0.3 * result.record["weight_bytes_before"]
    after = logits(model, ids)
    # int8 per channel on a random model: logits move by well under 2% of their range.
    assert float((after - before).abs().max()) < 0.02 * float(before.max() - before.min())


def test_overrides_keep_chosen_modules_in_fp32() -> None:
    model = make_tiny_llama()
    overrides = [LayerOverride(match=1, options={"enabled": False}), LayerOverride(match="lm_head", options={"enabled": False})]
    QuantizeWeightsInt8(QuantizeWeightsInt8Options(embeddings=False), overrides).run(handle_of(model), PassContext(Recipe()))
    assert isinstance(model.model.layers[1].mlp.up_proj, torch.nn.Linear)
    assert isinstance(model.lm_head, torch.nn.Linear) and isinstance(model.model.embed_tokens, torch.nn.Embedding)
    assert isinstance(model.model.layers[0].mlp.up_proj, Int8Linear)


def test_running_twice_is_refused() -> None:
    model = make_tiny_llama()
    quantize = QuantizeWeightsInt8(QuantizeWeightsInt8Options(), [])
    quantize.run(handle_of(model), PassContext(Recipe()))
    with pytest.raises(BadInputError, match="already int8-quantized"):
        quantize.run(handle_of(model), PassContext(Recipe()))


def test_group_size_must_divide_the_input_channels() -> None:
    model = make_tiny_llama()
    with pytest.raises(BadInputError, match="group_size 24 does not divide 64 input channels"):
        QuantizeWeightsInt8(QuantizeWeightsInt8Options(group_size=24), []).run(handle_of(model), PassContext(Recipe()))
