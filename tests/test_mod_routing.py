"""DiffCR's token routing on a real diffusers DiT block: ratio 1 is the plain block exactly,
kept tokens stay in spatial order, skipped tokens pass through unchanged, the MLP branch
is scaled by the router score, and ratio bins interpolate with a gradient to the ratio."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiTTransformer2DModel

from edgec.mod import RoutedBlock, add_routers, bins_around, block_forward, capacity, set_capacities, snap


@pytest.fixture(scope="module")
def transformer() -> DiTTransformer2DModel:
    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1, num_layers=3,
                                  sample_size=8, patch_size=2, num_embeds_ada_norm=3)
    with torch.no_grad():  # adaLN-zero starts as the identity: give the blocks something to do
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, 16, 16, generator=generator), torch.tensor([10, 700]), torch.tensor([0, 3])


def test_our_block_forward_is_diffusers_block_forward(transformer: DiTTransformer2DModel) -> None:
    hidden, t, y = _inputs()
    block = transformer.transformer_blocks[0]
    with torch.no_grad():
        theirs = block(hidden, timestep=t, class_labels=y)
        ours = block_forward(block, hidden, t, y)
    assert torch.equal(ours, theirs) and not torch.allclose(theirs, hidden)


def test_full_capacity_is_the_plain_model_exactly(transformer: DiTTransformer2DModel) -> None:
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    t, y = torch.tensor([10, 700]), torch.tensor([0, 3])
    with torch.no_grad():
        plain = transformer(x, t, y).sample
        routed_model = DiTTransformer2DModel.from_config(transformer.config)
        routed_model.load_state_dict(transformer.state_dict())
        blocks = add_routers(routed_model.eval())
        for block in blocks:
            torch.nn.init.normal_(block.router.weight)  # a trained router changes nothing at k = N
        set_capacities(blocks, [16, 16, 16])
        assert torch.equal(routed_model(x, t, y).sample, plain)
        set_capacities(blocks, [16, 8, 16])
        assert not torch.allclose(routed_model(x, t, y).sample, plain)


def test_kept_tokens_run_in_spatial_order_and_skipped_ones_pass_through(transformer: DiTTransformer2DModel) -> None:
    hidden, t, y = _inputs()
    routed = RoutedBlock(transformer.transformer_blocks[1], 16)
    torch.nn.init.normal_(routed.router.weight, generator=torch.Generator().manual_seed(3))
    k = capacity(0.5, 16)
    with torch.no_grad():
        out = routed.routed(hidden, t, y, k)
        scores = torch.sigmoid(routed.router(hidden)).squeeze(-1)
        top = torch.topk(scores, k, dim=1).indices
        expected_kept = torch.sort(top, dim=1).values
        changed = (out != hidden).any(-1)
        for b in range(2):
            kept = torch.nonzero(changed[b]).squeeze(-1)
            assert torch.equal(kept, expected_kept[b])  # exactly the top-k tokens moved, listed in spatial order
            skipped = ~changed[b]
            assert torch.equal(out[b, skipped], hidden[b, skipped])
        # The block ran on the kept tokens in spatial order, its MLP branch scaled by their scores.
        index = expected_kept.unsqueeze(-1).expand(-1, -1, 16)
        direct = block_forward(routed.block, torch.gather(hidden, 1, index), t, y, torch.gather(scores, 1, expected_kept))
        assert torch.equal(torch.gather(out, 1, index), direct)
        unscaled = block_forward(routed.block, torch.gather(hidden, 1, index), t, y)
        assert not torch.allclose(direct, unscaled)


def test_ratio_bins_interpolate_and_pass_the_gradient_to_the_ratio(transformer: DiTTransformer2DModel) -> None:
    assert [capacity(r, 256) for r in (0.1, 0.5, 0.8, 1.0)] == [26, 128, 205, 256]
    assert [snap(r) for r in (0.04, 0.74, 0.75001, 0.96, 1.3)] == [0.1, 0.7, 0.8, 1.0, 1.0]
    lower, upper, weight = bins_around(torch.tensor(0.73))
    assert (lower, upper) == (0.7, 0.8) and float(weight) == pytest.approx(0.3, rel=1e-5)
    assert bins_around(torch.tensor(1.0))[:2] == (1.0, 1.0) and bins_around(torch.tensor(0.02))[:2] == (0.1, 0.2)

    hidden, t, y = _inputs()
    routed = RoutedBlock(transformer.transformer_blocks[2], 16)
    torch.nn.init.normal_(routed.router.weight, generator=torch.Generator().manual_seed(4))
    ratio = torch.tensor(0.55, requires_grad=True)
    routed.ratio = ratio
    mixed = routed(hidden, timestep=t, class_labels=y)
    with torch.no_grad():
        low, high = routed.routed(hidden, t, y, capacity(0.5, 16)), routed.routed(hidden, t, y, capacity(0.6, 16))
    torch.testing.assert_close(mixed.detach(), low + 0.5 * (high - low))
    mixed.sum().backward()
    assert ratio.grad is not None and float(ratio.grad) == pytest.approx(float((high - low).sum() / 0.1), rel=1e-4)
