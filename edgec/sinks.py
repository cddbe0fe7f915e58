"""Attention sinks: the per-key statistic, sink detection, and ACT's calibrated attention.

ACT (attention calibration) finds the keys that soak up attention without carrying
meaning ("sinks"), keeps the first one, scales the columns of the others by `beta` and
hands the removed mass back to each row's non-sink keys in proportion, so every row
still sums to 1 and causal zeros stay zero. Sinks are recomputed from each input's own
attention inside the graph; nothing assumes they sit at position 0.

The sink score of key j is its attention averaged over the queries that see it:

* ``paper``: over every query of the forward pass, later ones included (as published).
  A decoder cannot know later queries, so with a KV cache this statistic only exists
  for the prefill; decode steps keep plain attention.
* ``causal`` (ours): query i uses the column sums of the queries up to itself, and the
  count i - j + 1. The column sums are carried between calls as cache state, so decode
  with a cache computes exactly what prefill computes on the same sequence.

A key is a sink when its score exceeds `threshold` (``threshold_mode: absolute``, the
authors' code: tau = 0.1) or `threshold` / N with N the number of keys the query sees
(``threshold_mode: alpha``, the paper's form: alpha about 5).

Every function here takes probabilities shaped [batch, heads, queries, keys] where the
queries are the last `queries` positions of the `keys` sequence (past = keys - queries).
They are plain tensor code so both exporters can lower them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Stat = Literal["paper", "causal"]
ThresholdMode = Literal["absolute", "alpha"]


@dataclass(frozen=True)
class SinkRule:
    """How sinks are found and calibrated on one head."""

    beta: float = 0.4
    threshold_mode: ThresholdMode = "absolute"
    threshold: float = 0.1
    keep_first: bool = True
    stat: Stat = "causal"


def _positions(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Absolute query positions [Tq, 1], key positions [1, Tk] and the visibility mask."""
    queries, keys = probs.shape[-2], probs.shape[-1]
    past = keys - queries
    query_pos = (torch.arange(queries, dtype=torch.int64) + past)[:, None]
    key_pos = torch.arange(keys, dtype=torch.int64)[None, :]
    return query_pos, key_pos, key_pos <= query_pos


def _one(like: torch.Tensor) -> torch.Tensor:
    # maximum with a tensor, not clamp(min=): TVM legalizes clamp's open upper bound as an
    # infinite constant, which it cannot cast for integer or symbolic shapes.
    return torch.ones((), dtype=like.dtype)


def sink_scores(
    probs: torch.Tensor, stat: Stat, past_sums: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(score of each key as each query sees it [B, H, Tq, Tk], column sums after this call [B, H, Tk]).

    `past_sums` [B, H, past] are the raw column sums of the queries before this call
    (``causal`` only; ``paper`` has no state).

    Written without cumsum or max over positions: TVM's CUDA build of a scan over a
    dynamic axis fails (divide by zero in its scheduler), and its max over a symbolic
    arange does not build either; a triangular matmul and sums over masks lower
    everywhere."""
    query_pos, key_pos, visible = _positions(probs)
    visible_f = visible.to(probs.dtype)
    # The state out is a plain sum: TVM mis-reads a negative index on a dynamic axis
    # (measured: garbage), so nothing here selects "the last row".
    sums = probs.sum(dim=-2)
    if stat == "paper":
        # How many of this call's queries see key j: all of them for past keys, fewer later.
        seen_by = visible_f.sum(dim=0, keepdim=True)
        return sums[..., None, :] / torch.maximum(seen_by, _one(probs)), sums
    # running[i, j] = sum of probs[i', j] over the queries i' <= i of this call.
    queries = probs.shape[-2]
    if isinstance(queries, int) and queries == 1:
        # A decode step (a static single query): nothing to accumulate, and a matmul with a
        # reduction of extent 1 trips TVM's GPU GEMV schedule.
        running = probs
    else:
        rows = torch.arange(queries, dtype=torch.int64)
        earlier = (rows[None, :] <= rows[:, None]).to(probs.dtype)
        running = torch.matmul(earlier, probs)
    if past_sums is not None:
        # The new keys have no past sums: extend with zeros shaped [B, H, Tq] (a concat, not a
        # pad by a symbolic amount, which TVM's importer cannot take).
        extended = torch.cat((past_sums, torch.zeros_like(probs[..., 0])), dim=-1)
        running = running + extended[..., None, :]
        sums = sums + extended
    count = torch.maximum((query_pos - key_pos + 1).to(probs.dtype), _one(probs))
    return running / count, sums


def find_sinks(probs: torch.Tensor, rule: SinkRule, past_sums: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sink mask [B, H, Tq, Tk] over the keys each query sees, column sums for the cache)."""
    scores, sums = sink_scores(probs, rule.stat, past_sums)
    query_pos, key_pos, visible = _positions(probs)
    if rule.threshold_mode == "alpha":
        # N: the keys the query sees (causal), or all keys of the pass (paper).
        if rule.stat == "paper":
            seen = (key_pos >= 0).to(probs.dtype).sum(dim=-1, keepdim=True)
        else:
            seen = (query_pos + 1).to(probs.dtype)
        sinks = scores * seen > rule.threshold
    else:
        sinks = scores > rule.threshold
    return sinks & visible, sums


def sinks_to_scale(probs: torch.Tensor, rule: SinkRule, past_sums: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sinks ACT scales: all but each row's first when keep_first, all sinks, column sums)."""
    sinks, sums = find_sinks(probs, rule, past_sums)
    if not rule.keep_first:
        return sinks, sinks, sums
    # The first sink of each row: the smallest sink position, as a max of negated
    # positions (a reduction, not a scan; TVM's importer has max.dim but not min.dim).
    _, key_pos, _ = _positions(probs)
    beyond = torch.full((), -(2**30), dtype=torch.int64)
    first_pos = -torch.where(sinks, -key_pos, beyond).max(dim=-1, keepdim=True).values
    return sinks & (key_pos != first_pos), sinks, sums


def calibrate(probs: torch.Tensor, rule: SinkRule, past_sums: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibrated probabilities, column sums for the cache): scale every sink but the
    first by `beta` and give the removed mass to the row's non-sink keys in proportion.
    A row with no non-sink mass is left as it is (nothing could receive the mass)."""
    scaled, sinks, sums = sinks_to_scale(probs, rule, past_sums)
    _, _, visible = _positions(probs)
    receivers = visible & ~sinks
    zero = torch.zeros((), dtype=probs.dtype)
    removed = (1.0 - rule.beta) * torch.where(scaled, probs, zero).sum(dim=-1, keepdim=True)
    receiving = torch.where(receivers, probs, zero).sum(dim=-1, keepdim=True)
    has_receivers = receiving > 0
    boost = 1.0 + removed / torch.where(has_receivers, receiving, torch.ones_like(receiving))
    one = torch.ones((), dtype=probs.dtype)
    factor = torch.where(scaled, torch.full((), rule.beta, dtype=probs.dtype), torch.where(receivers, boost, one))
    return torch.where(has_receivers, probs * factor, probs), sums
