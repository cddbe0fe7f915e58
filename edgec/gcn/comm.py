"""The collectives of distributed GCN training, instrumented: every all-to-all counts the
bytes this rank sends to the others (its own block, copied locally, is not sent), keyed by
(phase, layer, what), and the time spent waiting for it.

Two autograd-aware exchanges:
- the MoP layout switch of one pipeline chunk (columns <-> rows), asynchronous: `start`
  launches the all-to-all and returns a token, `finish` waits for it. Between the two the
  caller computes the next chunk, so the transfer of chunk c overlaps the work on c+1; the
  backward pass mirrors it (the gradient is switched back, launched by finish's backward and
  awaited by start's).
- the halo exchange of partition parallelism: a rank receives the rows of its halo from
  their owners; in backward the halo's gradient goes back and is summed into the owners' rows.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from edgec.gcn.plan import ELEMENT_BYTES


@dataclass
class Meter:
    """Bytes sent by this rank and seconds spent waiting, per (phase, layer, what)."""

    phase: str = "forward"
    sent: dict[tuple[str, int, str], int] = field(default_factory=lambda: defaultdict(int))
    waited: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def count(self, layer: int, what: str, phase: str | None, elements: int) -> None:
        self.sent[(phase or self.phase, layer, what)] += elements * ELEMENT_BYTES

    def wait(self, work: Any, phase: str | None = None) -> None:
        began = time.perf_counter()
        work.wait()
        self.waited[phase or self.phase] += time.perf_counter() - began

    def take(self) -> tuple[list[dict[str, Any]], dict[str, float]]:
        """The records since the last take, then reset."""
        rows = [{"phase": phase, "layer": layer, "what": what, "bytes": sent}
                for (phase, layer, what), sent in sorted(self.sent.items())]
        waited = dict(self.waited)
        self.sent, self.waited = defaultdict(int), defaultdict(float)
        return rows, waited


# ----------------------------------------------------------------------------- MoP switches
@dataclass
class ChunkGeometry:
    """One pipeline chunk seen from rank p: rows[q] = rows of worker q in this chunk,
    columns[q] = width of worker q's column slice (at the switched width)."""

    rank: int
    rows: list[int]
    columns: list[int]

    def to_rows_splits(self) -> tuple[list[int], list[int]]:
        """(send, receive) element counts per peer for columns -> rows."""
        p = self.rank
        return [r * self.columns[p] for r in self.rows], [self.rows[p] * c for c in self.columns]

    def to_columns_splits(self) -> tuple[list[int], list[int]]:
        send, receive = self.to_rows_splits()
        return receive, send


def _columns_to_rows(x: torch.Tensor, geometry: ChunkGeometry) -> tuple[torch.Tensor, list[int], list[int]]:
    """x: [sum(rows), columns[p]] (the chunk's rows of every worker, in worker order)."""
    send, receive = geometry.to_rows_splits()
    return x.contiguous().reshape(-1), send, receive


def _rows_from_received(flat: torch.Tensor, geometry: ChunkGeometry) -> torch.Tensor:
    rows = geometry.rows[geometry.rank]
    pieces = flat.split([rows * c for c in geometry.columns])
    return torch.cat([piece.reshape(rows, c) for piece, c in zip(pieces, geometry.columns)], dim=1)


def _rows_to_columns(x: torch.Tensor, geometry: ChunkGeometry) -> tuple[torch.Tensor, list[int], list[int]]:
    """x: [rows[p], sum(columns)]: worker q gets the block of its columns."""
    send, receive = geometry.to_columns_splits()
    flat = torch.cat([block.contiguous().reshape(-1) for block in x.split(geometry.columns, dim=1)])
    return flat, send, receive


def _columns_from_received(flat: torch.Tensor, geometry: ChunkGeometry) -> torch.Tensor:
    return flat.reshape(sum(geometry.rows), geometry.columns[geometry.rank])


_PACK = {"rows": (_columns_to_rows, _rows_from_received), "columns": (_rows_to_columns, _columns_from_received)}
_OTHER = {"rows": "columns", "columns": "rows"}


class _InFlight:
    """One launched all-to-all: the receive buffer and the handle to wait on."""

    def __init__(self, x: torch.Tensor, to: str, geometry: ChunkGeometry, meter: Meter, layer: int, what: str,
                 phase: str | None) -> None:
        pack, _ = _PACK[to]
        flat, send, receive = pack(x, geometry)
        self.received = flat.new_empty(sum(receive))
        self.to, self.geometry = to, geometry
        meter.count(layer, what, phase, sum(send) - send[geometry.rank])
        self.work = dist.all_to_all_single(self.received, flat, receive, send, async_op=True)

    def result(self, meter: Meter, phase: str | None) -> torch.Tensor:
        meter.wait(self.work, phase)
        _, unpack = _PACK[self.to]
        return unpack(self.received, self.geometry)


@dataclass
class _Link:
    """What start's and finish's autograd nodes share: the forward's transfer, the backward's."""

    to: str
    geometry: ChunkGeometry
    meter: Meter
    layer: int
    what: str
    forward: _InFlight | None = None
    backward: _InFlight | None = None


class _Start(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, link: _Link) -> torch.Tensor:  # type: ignore[override]
        ctx.link = link
        link.forward = _InFlight(x.detach(), link.to, link.geometry, link.meter, link.layer, link.what, None)
        return x.new_zeros(1)  # a token: the data travels in `link`

    @staticmethod
    def backward(ctx: Any, _token: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        link: _Link = ctx.link
        assert link.backward is not None
        return link.backward.result(link.meter, "backward"), None


class _Finish(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, _token: torch.Tensor, link: _Link) -> torch.Tensor:  # type: ignore[override]
        ctx.link = link
        assert link.forward is not None
        out = link.forward.result(link.meter, None)
        link.forward = None
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        link: _Link = ctx.link
        link.backward = _InFlight(grad, _OTHER[link.to], link.geometry, link.meter, link.layer, link.what, "backward")
        return grad.new_zeros(1), None


def start_switch(x: torch.Tensor, to: str, geometry: ChunkGeometry, meter: Meter, layer: int, what: str) -> tuple[torch.Tensor, _Link]:
    """Launch the switch of one chunk to `to` ("rows" or "columns"); finish it with
    `finish_switch` after other work."""
    link = _Link(to, geometry, meter, layer, what)
    return _Start.apply(x, link), link


def finish_switch(token: torch.Tensor, link: _Link) -> torch.Tensor:
    return _Finish.apply(token, link)


# ----------------------------------------------------------------------------- halo exchange
@dataclass
class Halo:
    """Rank p's view of partition parallelism: `send[q]` = local rows p sends q (indices
    into its own rows), `receive[q]` = how many halo rows come from q (in q's send order)."""

    send: list[torch.Tensor]
    receive: list[int]


class _HaloExchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, own: torch.Tensor, halo: Halo, meter: Meter, layer: int) -> torch.Tensor:  # type: ignore[override]
        ctx.halo, ctx.meter, ctx.layer, ctx.rows = halo, meter, layer, own.shape[0]
        width = own.shape[1]
        outgoing = torch.cat([own.index_select(0, index) for index in halo.send]).contiguous()
        incoming = own.new_empty(sum(halo.receive), width)
        send = [len(index) * width for index in halo.send]
        meter.count(layer, "halo", None, sum(send))  # a rank never sends itself halo rows
        meter.wait(dist.all_to_all_single(incoming.view(-1), outgoing.view(-1), [r * width for r in halo.receive], send,
                                          async_op=True))
        return torch.cat([own, incoming])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # type: ignore[override]
        halo, meter, rows = ctx.halo, ctx.meter, ctx.rows
        width = grad.shape[1]
        grad_own, grad_halo = grad[:rows], grad[rows:].contiguous()
        back = grad.new_empty(sum(len(index) for index in halo.send), width)
        send = [r * width for r in halo.receive]
        meter.count(ctx.layer, "halo", "backward", sum(send))
        meter.wait(dist.all_to_all_single(back.view(-1), grad_halo.view(-1), [len(i) * width for i in halo.send], send,
                                          async_op=True), "backward")
        # Each owned row receives the gradient of every rank whose halo it is in.
        return grad_own.index_add(0, torch.cat(halo.send), back), None, None, None


def exchange_halo(own: torch.Tensor, halo: Halo, meter: Meter, layer: int) -> torch.Tensor:
    """[own rows; halo rows] with the halo received from its owners."""
    return _HaloExchange.apply(own, halo, meter, layer)


def all_reduce_gradients(parameters: list[torch.nn.Parameter], meter: Meter) -> None:
    """Sum the replicated parameters' gradients over the ranks (one flat all-reduce)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    meter.count(-1, "gradient all-reduce", "backward", flat.numel())
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(parameters, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()
