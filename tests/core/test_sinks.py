"""ACT's calibrated attention (edgec.sinks) on planted attention matrices."""

from __future__ import annotations

import itertools

import pytest
import torch

from edgec.lm import AttentionCalibration
from edgec.sinks import SinkRule, calibrate, find_sinks

T = 24
# Sinks planted away from position 0, at different places per batch element.
PLANTED = ((1, 8), (2, 11))
# Early rows see few keys, so under the causal statistic any key they attend to is a sink
# for them; from this row on only the planted ones are.
SETTLED_ROW = 12
RULES = [
    SinkRule(stat=stat, threshold_mode=mode, threshold=threshold)
    for stat, (mode, threshold) in itertools.product(("paper", "causal"), (("absolute", 0.1), ("alpha", 3.0)))
]


def planted_probs(heads: int = 3, seed: int = 0) -> torch.Tensor:
    """Causal softmax attention [2, heads, T, T] whose planted columns soak up most of each row;
    key 0 is made weak so nothing about position 0 is assumed."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(2, heads, T, T, generator=generator) * 0.5
    for batch, columns in enumerate(PLANTED):
        for column in columns:
            scores[batch, :, :, column] += 5.0
    scores[..., 0] -= 6.0
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    return torch.softmax(scores.masked_fill(future, -1e9), dim=-1)


@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{r.stat}-{r.threshold_mode}")
def test_planted_sinks_are_found_where_they_were_planted(rule: SinkRule) -> None:
    sinks, _ = find_sinks(planted_probs(), rule)
    for batch, columns in enumerate(PLANTED):
        assert sinks[batch, :, -1].nonzero()[:, 1].unique().tolist() == list(columns)


@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{r.stat}-{r.threshold_mode}")
def test_rows_sum_to_one_causal_zeros_stay_and_the_first_sink_is_untouched(rule: SinkRule) -> None:
    probs = planted_probs()
    out, _ = calibrate(probs, rule)
    assert torch.allclose(out.sum(-1), torch.ones(2, 3, T), atol=1e-6)
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    assert torch.equal(out[..., future], probs[..., future])
    for batch, (first, second) in enumerate(PLANTED):
        rows = slice(max(second + 1, SETTLED_ROW), T)  # rows that see both planted sinks
        assert torch.equal(out[batch, :, rows, first], probs[batch, :, rows, first])
        assert torch.allclose(out[batch, :, rows, second], rule.beta * probs[batch, :, rows, second])
        # The removed mass went to the other keys, in proportion.
        others = [j for j in range(T) if j not in (first, second)]
        ratio = out[batch, :, -1, others] / probs[batch, :, -1, others]
        assert torch.allclose(ratio, ratio[..., :1].expand_as(ratio), rtol=1e-4) and bool((ratio > 1).all())


def test_beta_one_is_the_identity() -> None:
    probs = planted_probs()
    for rule in RULES:
        out, _ = calibrate(probs, SinkRule(beta=1.0, threshold_mode=rule.threshold_mode, threshold=rule.threshold, stat=rule.stat))
        assert torch.allclose(out, probs, atol=1e-7)


def test_keep_first_false_scales_every_sink() -> None:
    probs = planted_probs()
    out, _ = calibrate(probs, SinkRule(keep_first=False))
    first = PLANTED[0][0]
    assert torch.allclose(out[0, :, -1, first], 0.4 * probs[0, :, -1, first])


@pytest.mark.parametrize("mode,threshold", [("absolute", 0.1), ("alpha", 3.0)])
def test_decode_with_carried_sums_equals_prefill(mode: str, threshold: float) -> None:
    rule = SinkRule(threshold_mode=mode, threshold=threshold, stat="causal")  # type: ignore[arg-type]
    probs = planted_probs()
    full, full_sums = calibrate(probs, rule)
    _, sums = calibrate(probs[:, :, :1, :1], rule)
    for step in range(1, T):
        # A decode step sees the new query's row over all keys so far, plus the carried sums.
        row, sums = calibrate(probs[:, :, step : step + 1, : step + 1], rule, sums)
        assert torch.allclose(row[:, :, 0], full[:, :, step, : step + 1], atol=1e-6)
    assert torch.allclose(sums, full_sums, atol=1e-5)


def test_paper_statistic_looks_ahead_and_the_causal_one_does_not() -> None:
    """A key that only later queries attend to is a sink for earlier rows under the paper's
    statistic: the deviation edgec's `causal` statistic removes."""
    probs = planted_probs()
    paper, _ = find_sinks(probs, SinkRule(stat="paper"))
    causal, _ = find_sinks(probs, SinkRule(stat="causal"))
    assert not torch.equal(paper, causal)


def test_rows_without_non_sink_mass_stay_finite_and_unchanged() -> None:
    probs = torch.zeros(1, 1, 4, 4)
    probs[0, 0, 0, 0] = 1.0  # the first query sees only itself
    probs[0, 0, 1:, 0] = 0.5
    probs[0, 0, 1:, 1] = 0.5  # rows 1-3: all mass on keys 0 and 1, both sinks
    for rule in RULES:
        out, _ = calibrate(probs, rule)
        assert bool(torch.isfinite(out).all())
        assert torch.equal(out, probs)


def test_calibration_touches_only_the_chosen_heads() -> None:
    probs = planted_probs(heads=4)
    calibration = AttentionCalibration([3, 1], num_heads=4, rule=SinkRule())
    out, sums = calibration(probs, None)
    assert torch.equal(out[:, [0, 2]], probs[:, [0, 2]])
    expected, _ = calibrate(probs[:, [1, 3]], SinkRule())
    assert torch.equal(out[:, [1, 3]], expected)
    assert sums.shape == (2, 2, T)
