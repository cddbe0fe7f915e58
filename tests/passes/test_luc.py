"""luc: packed weights, pruning patterns, the budgeted policy, the pass on a model, bad input."""

from pathlib import Path

import pytest
from pydantic import ValidationError
import torch

from edgec.errors import BadInputError
from edgec.lm import CausalLMEntries
from edgec.model import FAMILY_CAUSAL_LM, ModelHandle
from edgec.packing import (
    SUPPORTED_BITS,
    PackedEmbedding,
    PackedLinear,
    compress_nm,
    dequantize,
    pack_codes,
    quantize,
    unpack_codes,
    unpack_plane,
)
from edgec.passes.luc import (
    Luc,
    LucOptions,
    allocate_bits,
    allocate_sparsity,
    check_budget,
    layer_overrides,
    plan_layers,
    sparse_code_bytes,
)
from edgec.passes.prune import GroupQuant, obs_compress, sparsegpt, wanda
from edgec.pipeline import PassContext
from edgec.recipe import LayerOverride, Recipe
from tests.conftest import TINY_CONFIG, make_tiny_llama


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_packed_codes_round_trip_exactly_at_their_width(bits: int) -> None:
    codes = torch.randint(0, 1 << bits, (6, 64), generator=torch.Generator().manual_seed(bits), dtype=torch.int32)
    planes = pack_codes(codes, bits)
    assert all(p.dtype == torch.uint8 for p in planes)
    assert sum(p.numel() for p in planes) == codes.numel() * bits // 8  # exactly `bits` bits a weight
    assert torch.equal(unpack_codes(planes, bits), codes)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_quantized_weights_decode_to_code_times_scale_and_keep_zeros(bits: int, symmetric: bool) -> None:
    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    weight[:, ::3] = 0.0
    packed = quantize(weight, bits, 16, symmetric)
    decoded = dequantize(packed.planes, packed.scales, packed.zeros, bits, 16)
    codes = unpack_codes(packed.planes, bits).reshape(8, 4, 16).float()
    zero = 2.0 ** (bits - 1) if packed.zeros is None else packed.zeros.float()[..., None]
    expected = ((codes - zero) * packed.scales.float()[..., None]).reshape(8, 64)
    assert torch.equal(decoded, expected)
    assert bool((decoded[:, ::3] == 0).all())
    if bits >= 3:  # round to nearest; an asymmetric group also rounds its zero point
        step = packed.scales.float().repeat_interleave(16, dim=1)
        assert bool(((decoded - weight).abs() <= step * (0.5 if symmetric else 1.0) + 1e-6).all())


def _q4_1_weights(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Weights as llama.cpp's Q4_1 stores them: per group of 32, 4-bit codes, a float16
    scale and a float16 minimum, every group using its lowest and highest code."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (rows, cols // 32, 32), generator=generator).float()
    codes[..., 0], codes[..., 1] = 0, 15
    scale = (torch.rand(rows, cols // 32, 1, generator=generator) * 0.05 + 0.001).half().float()
    low = (-torch.rand(rows, cols // 32, 1, generator=generator) * 0.4).half().float()
    return (codes * scale + low).reshape(rows, cols)


def test_the_offset_grid_requantizes_q4_1_weights_without_loss_where_a_zero_point_cannot() -> None:
    weight = _q4_1_weights(16, 128, seed=5)
    packed = quantize(weight, 4, 32, symmetric=False, offset=True)
    assert packed.zeros is not None and packed.zeros.dtype == torch.float16 and packed.nbytes() == 16 * 4 * (16 + 2 + 2)
    assert torch.equal(dequantize(packed.planes, packed.scales, packed.zeros, 4, 32), weight)
    integer = quantize(weight, 4, 32, symmetric=False)
    assert float((dequantize(integer.planes, integer.scales, integer.zeros, 4, 32) - weight).abs().max()) > 1e-3
    # GPTQ on the offset grid keeps weights already on it where they are.
    x = torch.randn(256, 128, generator=torch.Generator().manual_seed(6))
    result = obs_compress(weight, x.T @ x, 0.0, "unstructured", GroupQuant(4, 32, symmetric=False, offset=True))
    assert torch.equal(result.weight, weight)


def test_the_offset_grid_is_refused_where_a_weight_must_decode_to_zero() -> None:
    with pytest.raises(ValueError, match="multiple of the group"):
        quantize(torch.randn(4, 48), 4, 32, symmetric=False, offset=True)  # a padded ragged group
    packed = quantize(_two_of_four(8, 64), 4, 16, symmetric=False, offset=True)
    assert compress_nm(packed, 2, 4) is None  # no code of 0.0 to leave out
    with pytest.raises(ValidationError, match="symmetric: false"):
        LucOptions(offset=True, symmetric=True)


def _two_of_four(rows: int, cols: int) -> torch.Tensor:
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(2))
    blocks = weight.reshape(rows, cols // 4, 4)
    keep = torch.zeros_like(blocks, dtype=torch.bool).scatter_(-1, blocks.abs().topk(2, dim=-1).indices, True)
    return (blocks * keep).reshape(rows, cols)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_two_of_four_storage_keeps_half_the_codes_and_decodes_to_the_same_weights(bits: int, symmetric: bool) -> None:
    dense = quantize(_two_of_four(8, 64), bits, 16, symmetric)
    compressed = compress_nm(dense, 2, 4)
    assert compressed is not None and compressed.shape == dense.shape == (8, 64)
    assert sum(p.numel() for p in compressed.planes) == 8 * 32 * bits // 8  # half the codes
    assert compressed.index is not None and compressed.index.numel() == 8 * 32 * 2 // 8  # 2 bits per kept code
    positions = unpack_plane(compressed.index, 2).reshape(8, 16, 2)
    assert bool((positions[..., 0] < positions[..., 1]).all())  # ascending within each block of 4
    decoded = dequantize(dense.planes, dense.scales, dense.zeros, bits, 16)
    assert torch.equal(dequantize(compressed.planes, compressed.scales, compressed.zeros, bits, 16, compressed.index, 2, 4), decoded)
    x = torch.randn(3, 64)
    assert torch.allclose(PackedLinear(compressed, None)(x), PackedLinear(dense, None)(x), atol=1e-5)
    # (bits + 2) / 2 bits per weight against bits: smaller above 2 bits, equal at 2.
    saved = dense.nbytes() - compressed.nbytes()
    assert saved == 8 * 64 * (bits - 2) // 16


def test_compressed_storage_is_refused_where_the_pattern_does_not_hold() -> None:
    dense = quantize(torch.randn(8, 64, generator=torch.Generator().manual_seed(3)), 4, 16, False)
    assert compress_nm(dense, 2, 4) is None  # blocks with 3 or 4 nonzero codes
    assert compress_nm(quantize(_two_of_four(8, 64), 4, 16, False), 2, 8) is None  # no 3-bit position index


def test_wanda_and_sparsegpt_masks_have_the_requested_pattern() -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 64, generator=generator)
    x = torch.randn(256, 64, generator=generator) * torch.linspace(0.1, 3.0, 64)
    sq_sum, gram = (x * x).sum(0), x.T @ x
    for pruned in (wanda(weight, sq_sum, 0.5, "2:4"), sparsegpt(weight, gram, 0.5, "2:4")):
        zeros_per_group = (pruned.reshape(16, 16, 4) == 0).sum(-1)
        assert bool((zeros_per_group == 2).all())  # counted per group of 4, not on average
    for pruned in (wanda(weight, sq_sum, 0.25, "unstructured"), sparsegpt(weight, gram, 0.25, "unstructured")):
        assert abs(float((pruned == 0).float().mean()) - 0.25) < 0.02
    for pruned in (wanda(weight, sq_sum, 0.25, "channel"), sparsegpt(weight, gram, 0.25, "channel")):
        dead = (pruned == 0).all(0)
        assert int(dead.sum()) == 16 and bool((pruned[:, ~dead] != 0).all())


def correlated_inputs(generator: torch.Generator) -> torch.Tensor:
    """512 inputs of width 128, correlated as activations are: rank 16 plus noise."""
    x = torch.randn(512, 16, generator=generator) @ torch.randn(16, 128, generator=generator)
    return x + 0.1 * torch.randn(512, 128, generator=generator)


def test_sparsegpt_reconstruction_loses_less_output_than_wanda() -> None:
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(32, 128, generator=generator)
    x = correlated_inputs(generator)
    dense = x @ weight.T
    errors = {}
    for name, pruned in (
        ("wanda", wanda(weight, (x * x).sum(0), 0.5, "unstructured")),
        ("sparsegpt", sparsegpt(weight, x.T @ x, 0.5, "unstructured")),
    ):
        errors[name] = float((x @ pruned.T - dense).norm() / dense.norm())
    assert errors["sparsegpt"] < 0.5 * errors["wanda"], errors


def test_bits_policy_meets_the_budget_and_favours_sensitive_layers() -> None:
    damage = [{2: 5.0, 3: 1.0, 4: 0.2, 8: 0.0}, {2: 0.05, 3: 0.02, 4: 0.01, 8: 0.0}] * 4
    bits = allocate_bits(damage, [2, 3, 4, 8], 4.0, fixed={})
    assert sum(bits) / len(bits) == pytest.approx(4.0, abs=1 / len(bits))
    assert min(bits[0::2]) > max(bits[1::2])  # the sensitive layers get more bits
    fixed = allocate_bits(damage, [2, 3, 4, 8], 4.0, fixed={1: 8})
    assert fixed[1] == 8 and sum(fixed) / len(fixed) <= 4.0


def test_sparsity_policy_meets_the_budget_within_the_ceiling() -> None:
    scores = [10.0, 0.1, 0.2, 5.0, 0.0, 0.3]
    sparsity = allocate_sparsity(scores, 0.5, fixed={}, temper=0.8, ceiling=0.7)
    assert sum(sparsity) / len(sparsity) == pytest.approx(0.5)
    assert max(sparsity) <= 0.7 + 1e-9 and sparsity[0] == min(sparsity)
    uniform = plan_layers(LucOptions(policy="uniform", bits=4, sparsity=0.3), None, {}, 6)
    assert {(p.bits, p.sparsity) for p in uniform} == {(4, 0.3)}


def test_budgets_that_cannot_be_met_are_refused_before_work() -> None:
    with pytest.raises(BadInputError, match="cannot be met"):
        check_budget(LucOptions(bits=2.5, bits_floor=3), {}, 4)
    with pytest.raises(BadInputError, match="uniform"):
        check_budget(LucOptions(policy="uniform", bits=3.5), {}, 4)
    with pytest.raises(BadInputError, match="prunes exactly 0.5"):
        check_budget(LucOptions(pattern="2:4", sparsity=0.3), {}, 4)
    with pytest.raises(BadInputError, match="cannot be met"):
        check_budget(LucOptions(bits=4), {0: {"bits": 8}, 1: {"bits": 8}, 2: {"bits": 8}}, 4)
    with pytest.raises(ValueError, match="edgec packs"):
        LucOptions(bit_choices=[5])


def test_overrides_fix_layers_and_unknown_layers_are_named() -> None:
    fixed = layer_overrides([LayerOverride(match="0-1", options={"bits": 8, "sparsity": 0.0})], 4)
    assert fixed == {0: {"bits": 8.0, "sparsity": 0.0}, 1: {"bits": 8.0, "sparsity": 0.0}}
    with pytest.raises(BadInputError, match="matches no decoder layer; the model has layers 0-3"):
        layer_overrides([LayerOverride(match=7, options={"bits": 8})], 4)
    with pytest.raises(BadInputError, match="only bits, sparsity"):
        layer_overrides([LayerOverride(match=1, options={"group_size": 8})], 4)


def _handle(model: torch.nn.Module) -> ModelHandle:
    return ModelHandle("tiny", FAMILY_CAUSAL_LM, "LlamaForCausalLM", Path("."), "1" * 64, module=model)


def _segments() -> list[list[int]]:
    generator = torch.Generator().manual_seed(5)
    return torch.randint(0, TINY_CONFIG["vocab_size"], (8, 32), generator=generator).tolist()


def test_pass_compresses_every_linear_and_shares_the_tied_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEC_CACHE_DIR", str(tmp_path))
    model = make_tiny_llama()
    ids = torch.tensor(_segments()[:1])
    with torch.no_grad():
        dense = CausalLMEntries(model).prefill(ids)[0]
    options = LucOptions(bits=5, sparsity=0.3, group_size=16, pruning="sparsegpt", validation_samples=2)
    ctx = PassContext(Recipe(), calibration_ids=_segments)
    result = Luc(options, [LayerOverride(match=0, options={"bits": 8})]).run(_handle(model), ctx)
    record = result.record
    assert not [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert isinstance(model.model.embed_tokens, PackedEmbedding) and isinstance(model.lm_head, PackedLinear)
    assert model.lm_head.plane0.data_ptr() == model.model.embed_tokens.plane0.data_ptr()
    assert record["layers"][0]["bits"] == 8 and record["layers"][0]["fixed_by_override"]
    assert record["layers"][1]["bits"] == 2 and record["achieved"]["bits"] == 5.0
    assert record["achieved"]["sparsity"] == pytest.approx(0.3, abs=0.02)
    assert record["weight_bytes_after"] < 0.3 * record["weight_bytes_before"]
    assert record["sensitivity_profile"]["source"] == "measured"
    assert all(0 <= row["gptq_linears"] <= 7 for row in record["layers"])
    with torch.no_grad():
        compressed = CausalLMEntries(model).prefill(ids)[0]
    assert bool(torch.isfinite(compressed).all()) and not torch.equal(compressed, dense)
    # The same model and calibration again: the profile comes from the cache.
    again = Luc(options, []).run(_handle(make_tiny_llama()), ctx)
    assert again.record["sensitivity_profile"]["source"] == "cache"


@pytest.mark.parametrize("policy", ["sensitivity", "uniform"])
def test_a_size_budget_sets_the_bits_and_the_model_fits_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, policy: str) -> None:
    monkeypatch.setenv("EDGEC_CACHE_DIR", str(tmp_path))
    ctx = PassContext(Recipe(), calibration_ids=_segments)
    common = {"group_size": 16, "validation_samples": 2, "quantizer": "rtn", "bit_choices": [2, 4, 8], "policy": policy}
    sizes = {b: Luc(LucOptions(bits=b, **common), []).run(_handle(make_tiny_llama()), ctx).record["weight_bytes_after"] for b in (2, 4, 8)}
    budget = (sizes[4] + sizes[8]) // 2
    record = Luc(LucOptions(size_bytes=budget, **common), []).run(_handle(make_tiny_llama()), ctx).record
    achieved = record["achieved"]["weight_bytes"]
    assert record["weight_bytes_after"] == achieved <= budget
    if policy == "uniform":  # every layer the most bits that fit
        assert achieved == sizes[4] and [row["bits"] for row in record["layers"]] == [4, 4]
    else:  # within one layer's step from 4 to 8 bits of the budget
        assert budget - (sizes[8] - sizes[4]) / 2 < achieved and 4 < record["achieved"]["bits"] <= 8
    assert record["budget"]["size_bytes"] == budget
    with pytest.raises(BadInputError, match=f"size_bytes {sizes[2] - 1} cannot be met: at 2 bits .* take {sizes[2]} bytes"):
        Luc(LucOptions(size_bytes=sizes[2] - 1, **common), []).run(_handle(make_tiny_llama()), ctx)


def test_pass_refuses_too_few_calibration_samples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEC_CACHE_DIR", str(tmp_path))
    ctx = PassContext(Recipe(), calibration_ids=_segments)
    with pytest.raises(BadInputError, match="set calibration.samples above 8"):
        Luc(LucOptions(group_size=16, validation_samples=8), []).run(_handle(make_tiny_llama()), ctx)


@pytest.mark.parametrize("symmetric", [False, True])
def test_a_ragged_last_group_is_padded_with_zero_codes_and_never_read(symmetric: bool) -> None:
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(8, 40, generator=generator)
    weight[weight.abs() < 0.3] = 0.0
    packed = quantize(weight, 4, 16, symmetric)
    assert packed.shape == (8, 40) and packed.stored_shape == (8, 48) and packed.scales.shape == (8, 3)
    # The stored tail decodes to exactly 0 (its codes are the zero code).
    full = dequantize(packed.planes, packed.scales, packed.zeros, 4, 16)
    assert full.shape == (8, 48) and torch.count_nonzero(full[:, 40:]) == 0
    linear = PackedLinear(packed, None)
    decoded = linear.weight_fp32()
    assert decoded.shape == (8, 40) and torch.all(decoded[weight == 0] == 0)
    # The last group's scale covers its 8 real weights only: as tight as quantizing them alone.
    tail = quantize(weight[:, 32:], 4, 8, symmetric)
    assert torch.equal(packed.scales[:, 2], tail.scales[:, 0])
    x = torch.randn(3, 40, generator=generator)
    torch.testing.assert_close(linear(x), x @ decoded.T, rtol=0, atol=1e-6)
    assert compress_nm(packed, 2, 4) is None  # N:M storage is for whole groups only


def test_pass_compresses_widths_the_group_does_not_divide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tiny Llama: hidden 64 and MLP 128 in groups of 48 (16 and 32 left over)."""
    monkeypatch.setenv("EDGEC_CACHE_DIR", str(tmp_path))
    model = make_tiny_llama()
    ids = torch.tensor(_segments()[:1])
    with torch.no_grad():
        dense = CausalLMEntries(model).prefill(ids)[0]
    ctx = PassContext(Recipe(), calibration_ids=_segments)
    options = LucOptions(bits=8, sparsity=0.0, bit_choices=[8], group_size=48, embedding_bits=8, validation_samples=2)
    record = Luc(options, []).run(_handle(model), ctx).record
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, PackedLinear) and (down.in_features, down.scales.shape[1]) == (128, 3)
    assert record["weight_bytes_after"] < 0.4 * record["weight_bytes_before"]
    with torch.no_grad():
        compressed = CausalLMEntries(model).prefill(ids)[0]
    # 8 bits everywhere: the logits move by a small fraction of their range.
    assert float((compressed - dense).abs().max()) < 0.02 * float(dense.max() - dense.min())


def test_gptq_rounds_onto_its_grid_with_less_output_error_than_round_to_nearest() -> None:
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(32, 128, generator=generator)
    x = correlated_inputs(generator)
    dense = x @ weight.T
    result = obs_compress(weight, x.T @ x, 0.0, "unstructured", GroupQuant(3, 32, symmetric=False))
    assert result.params is not None and not bool(result.pruned.any())
    packed = quantize(result.weight, 3, 32, symmetric=False, params=result.params)
    decoded = dequantize(packed.planes, packed.scales, packed.zeros, 3, 32)
    assert torch.equal(decoded, result.weight)  # exactly the values GPTQ chose
    rtn = quantize(weight, 3, 32, symmetric=False)
    rtn_error = float((x @ dequantize(rtn.planes, rtn.scales, rtn.zeros, 3, 32).T - dense).norm())
    assert float((x @ decoded.T - dense).norm()) < 0.7 * rtn_error


def test_sparse_storage_bytes_say_when_a_mask_costs_more_than_it_saves() -> None:
    total = 1024
    assert sparse_code_bytes(total, total // 2, 4, "2:4") == total * 3 // 8  # 25% below dense 4-bit codes
    assert sparse_code_bytes(total, int(total * 0.3), 4, "unstructured") < total * 4 // 8
    assert sparse_code_bytes(total, int(total * 0.1), 2, "unstructured") > total * 2 // 8  # the mask costs more
