"""A decode step's attention as one CPU kernel (edgec::decode_attention).

As matmuls, a decode step's attention over a 1,024-token cache was ten kernels per layer:
the scores over the cache and over the new key, their concatenation, the scale, a softmax,
the split of the probabilities, the products with the cached values and with the new
value, and their sum; each with its own parallel launch and pass over the context, and the
K and V reads spread over three KV heads on the threads (SmolLM2: 3 heads on 2 cores,
one core idle a third of the time).

Here one kernel does it, flash-decoding style:
- the context is cut into chunks of CHUNK positions, and (batch, KV head, chunk) are the
  parallel work items, so the threads share any number of heads evenly;
- per item, each cached key row is read once (converted from float16, or from int8 and
  scaled, as it is read) for every query head of its group: the head-dim product summed
  lane-wise into 16 lanes and the lanes by a tree of vector adds; then the chunk's softmax
  numerators (max, fast exp) and their products with the chunk's values, each value row
  read once (an int8 cache's value scales are applied to the chunk's sums, in the epilogue);
- a layer's rows lie a whole position apart in the position-major cache, a stride the
  hardware prefetcher does not follow across pages: the kernel prefetches the key and
  value rows AHEAD positions on (SmolLM2's float16 cache at 1,024 tokens, one layer, cold
  caches: 37 -> 21-27 us);
- a serial epilogue adds the new position's key and value and combines the chunks'
  partial results (each rescaled by its own maximum), so no chunk waits on another.
"""

from __future__ import annotations

from typing import Any

import tvm
from tvm import relax, tirx
from tvm.script import tirx as T

from edgec.decode_attention import HEAD_DIM_MULTIPLE
from edgec.targets.tvm_schedule import RULE_ATTR, rule_calls

__all__ = ["ATTENTION_RULE", "CHUNK", "LANES", "attention_calls", "attention_converters", "decode_attention_func"]

ATTENTION_RULE = "decode-attention"
# Positions per parallel work item: SmolLM2 at 1,024 tokens has 3 x 16 items for 2 cores.
CHUNK = 64
# A score's head-dim product is summed into this many lanes, then by a tree of halvings
# (8, 4, 2, 1: written out in the kernel).
LANES = HEAD_DIM_MULTIPLE
_LOWEST = -3.0e38
# Positions a key or value row is prefetched ahead of its use, and the line size it is fetched in.
AHEAD = 32
CACHE_LINE = 64

# exp(x) = 2^n * e^r, r = x - n ln 2 in [-ln2/2, ln2/2], e^r by a degree-7 polynomial
# (Cephes' expf coefficients), 2^n written into the float's exponent bits: plain arithmetic
# that LLVM vectorizes, where T.exp is a call of libm's expf per element.
_EXP_COEFFICIENTS = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)


def fast_exp(x: Any) -> Any:
    """e^x of a float32 expression, inputs clamped to +-88.37 (e^-88.37 ~ 4e-39)."""
    f32 = "float32"
    clamped = tirx.max(tirx.min(x, tirx.const(88.3762626647950, f32)), tirx.const(-88.3762626647949, f32))
    n = tirx.floor(clamped * tirx.const(1.44269504088896341, f32) + tirx.const(0.5, f32))
    r = clamped - n * tirx.const(0.6931471805599453, f32)
    poly = tirx.const(_EXP_COEFFICIENTS[0], f32)
    for coefficient in _EXP_COEFFICIENTS[1:]:
        poly = poly * r + tirx.const(coefficient, f32)
    e_r = poly * r * r + r + tirx.const(1.0, f32)
    two_n = tirx.reinterpret(f32, tirx.shift_left(tirx.Cast("int32", n) + tirx.const(127, "int32"), tirx.const(23, "int32")))
    return two_n * e_r


def decode_attention_func(kv: int, groups: int, dim: int, layers: int, heads: int, cache_dtype: str, layer: int,
                          head_offset: int, scale: float) -> tirx.PrimFunc:
    """out[B, KV, G, D] = attention of q[B, KV, G, D] over the cache's P positions of this
    layer's heads (pk, pv [P, L, B, H, D]: `layer`, heads from `head_offset`) and the new
    key and value k, v [B, KV, D]; B and P symbolic. An int8 cache takes its scales too
    (ks, vs [L, H, D], after pv): keys are scaled as they are read, the values' sums once
    per chunk, in the serial epilogue."""
    if dim % LANES:
        raise ValueError(f"decode attention kernel: head dim {dim} is not a multiple of {LANES}")
    parts = dim // LANES
    per_line = CACHE_LINE * 8 // tvm.DataType(cache_dtype).bits  # cache values per line
    lines = max(1, dim // per_line)
    fvec = f"float32x{dim}"
    scale_ = float(scale)
    scaled = cache_dtype == "int8"

    # A work item's coordinates, as expressions: a name assigned in TVMScript is a mutable
    # local in this TVM, one workspace-pool call per parallel task (see tvm_dot).
    def _chunks(past: Any) -> Any:
        return (past + (CHUNK - 1)) // CHUNK

    def _start(w: Any, past: Any) -> Any:
        return w % _chunks(past) * CHUNK

    def _count(w: Any, past: Any) -> Any:  # positions in the item's chunk
        return T.min(T.int64(CHUNK), past - _start(w, past))

    def _batch(w: Any, past: Any) -> Any:
        return w // (kv * _chunks(past))

    def _head(w: Any, past: Any) -> Any:  # of the KV heads
        return w // _chunks(past) % kv

    def _query(q: Any, w: Any, past: Any, g: Any, cols: Any) -> Any:
        return q[_batch(w, past), _head(w, past), g, cols]

    def _cached(cache: Any, w: Any, past: Any, position: Any, cols: Any) -> Any:
        """cache[position, layer, the item's batch row, its head, cols]."""
        return cache[position, layer, _batch(w, past), head_offset + _head(w, past), cols]

    def _key(pk: Any, ks: Any, w: Any, past: Any, t: Any, cols: Any) -> Any:
        """A cached key's values at cols, in float32 (an int8 one times its scales)."""
        key = T.Cast(f"float32x{LANES}", _cached(pk, w, past, _start(w, past) + t, cols))
        return key if ks is None else key * ks[layer, head_offset + _head(w, past), cols]

    def _summed(acc: Any, vs: Any, item: Any, g: Any, h: Any) -> Any:
        """A chunk's sum of numerators times values (int8 values: times their scales)."""
        summed = acc[item, g, T.ramp(0, 1, dim)]
        return summed if vs is None else summed * vs[layer, head_offset + h, T.ramp(0, 1, dim)]

    # The kernel's body, expanded in the float and the int8 cache's functions below (their
    # parameters differ); ks and vs are None for a float cache.
    @T.macro
    def body(batch: Any, past: Any, q: Any, k: Any, v: Any, pk: Any, pv: Any, ks: Any, vs: Any, out: Any) -> None:
        # Per work item: the chunk's scores (then numerators), its maximum, their sum, and
        # the numerators' products with the values.
        scores = T.alloc_buffer((batch * kv * _chunks(past), groups, CHUNK), "float32")
        peak = T.alloc_buffer((batch * kv * _chunks(past), groups), "float32")
        total = T.alloc_buffer((batch * kv * _chunks(past), groups), "float32")
        acc = T.alloc_buffer((batch * kv * _chunks(past), groups, dim), "float32")
        for w in T.parallel(batch * kv * _chunks(past)):
            for t in range(_count(w, past)):
                # The rows AHEAD positions on (the module docstring says why).
                for line in T.unroll(lines):
                    T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(
                        _cached(pk, w, past, T.min(_start(w, past) + t + AHEAD, past - 1), line * per_line)), 0, 3, 1))
                    T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(
                        _cached(pv, w, past, T.min(_start(w, past) + t + AHEAD, past - 1), line * per_line)), 0, 3, 1))
                for g in T.unroll(groups):
                    lane = T.alloc_buffer((LANES,), "float32")
                    lane[T.ramp(0, 1, LANES)] = T.broadcast(T.float32(0), LANES)
                    for part in T.unroll(parts):
                        lane[T.ramp(0, 1, LANES)] = lane[T.ramp(0, 1, LANES)] + _query(q, w, past, g, T.ramp(part * LANES, 1, LANES)) * _key(
                            pk, ks, w, past, t, T.ramp(part * LANES, 1, LANES))
                    lane[T.ramp(0, 1, 8)] = lane[T.ramp(0, 1, 8)] + lane[T.ramp(8, 1, 8)]
                    lane[T.ramp(0, 1, 4)] = lane[T.ramp(0, 1, 4)] + lane[T.ramp(4, 1, 4)]
                    lane[T.ramp(0, 1, 2)] = lane[T.ramp(0, 1, 2)] + lane[T.ramp(2, 1, 2)]
                    scores[w, g, t] = (lane[0] + lane[1]) * T.float32(scale_)
            # The chunk's maximum and sum over whole vectors (a chunk's tail masked), each
            # finished by a tree: a scalar loop over the positions is a chain of dependent adds.
            for g in range(groups):
                lane = T.alloc_buffer((LANES,), "float32")
                lane[T.ramp(0, 1, LANES)] = T.broadcast(T.float32(_LOWEST), LANES)
                for part in T.unroll(CHUNK // LANES):
                    for i in T.vectorized(LANES):
                        lane[i] = T.max(lane[i], T.Select(T.Cast("int64", part * LANES + i) < _count(w, past),
                                                          scores[w, g, part * LANES + i], T.float32(_LOWEST)))
                lane[T.ramp(0, 1, 8)] = T.max(lane[T.ramp(0, 1, 8)], lane[T.ramp(8, 1, 8)])
                lane[T.ramp(0, 1, 4)] = T.max(lane[T.ramp(0, 1, 4)], lane[T.ramp(4, 1, 4)])
                lane[T.ramp(0, 1, 2)] = T.max(lane[T.ramp(0, 1, 2)], lane[T.ramp(2, 1, 2)])
                peak[w, g] = T.max(lane[0], lane[1])
                for t in T.vectorized(CHUNK):
                    scores[w, g, t] = T.Select(T.Cast("int64", t) < _count(w, past), fast_exp(scores[w, g, t] - peak[w, g]), T.float32(0))
                lane[T.ramp(0, 1, LANES)] = T.broadcast(T.float32(0), LANES)
                for part in T.unroll(CHUNK // LANES):
                    lane[T.ramp(0, 1, LANES)] = lane[T.ramp(0, 1, LANES)] + scores[w, g, T.ramp(part * LANES, 1, LANES)]
                lane[T.ramp(0, 1, 8)] = lane[T.ramp(0, 1, 8)] + lane[T.ramp(8, 1, 8)]
                lane[T.ramp(0, 1, 4)] = lane[T.ramp(0, 1, 4)] + lane[T.ramp(4, 1, 4)]
                lane[T.ramp(0, 1, 2)] = lane[T.ramp(0, 1, 2)] + lane[T.ramp(2, 1, 2)]
                total[w, g] = lane[0] + lane[1]
                acc[w, g, T.ramp(0, 1, dim)] = T.broadcast(T.float32(0), dim)
            for t in range(_count(w, past)):
                for g in T.unroll(groups):
                    acc[w, g, T.ramp(0, 1, dim)] = acc[w, g, T.ramp(0, 1, dim)] + T.broadcast(scores[w, g, t], dim) * T.Cast(
                        fvec, _cached(pv, w, past, _start(w, past) + t, T.ramp(0, 1, dim)))
        for b, h, g in T.grid(batch, kv, groups):
            lane = T.alloc_buffer((LANES,), "float32")
            best = T.alloc_buffer((1,), "float32")
            weight = T.alloc_buffer((1,), "float32")
            lane[T.ramp(0, 1, LANES)] = T.broadcast(T.float32(0), LANES)
            for part in T.unroll(parts):
                lane[T.ramp(0, 1, LANES)] = lane[T.ramp(0, 1, LANES)] + q[b, h, g, T.ramp(part * LANES, 1, LANES)] * k[
                    b, h, T.ramp(part * LANES, 1, LANES)]
            lane[T.ramp(0, 1, 8)] = lane[T.ramp(0, 1, 8)] + lane[T.ramp(8, 1, 8)]
            lane[T.ramp(0, 1, 4)] = lane[T.ramp(0, 1, 4)] + lane[T.ramp(4, 1, 4)]
            lane[T.ramp(0, 1, 2)] = lane[T.ramp(0, 1, 2)] + lane[T.ramp(2, 1, 2)]
            lane[0] = (lane[0] + lane[1]) * T.float32(scale_)  # the new key's score
            best[0] = lane[0]
            for c in range(_chunks(past)):
                best[0] = T.max(best[0], peak[(b * kv + h) * _chunks(past) + c, g])
            lane[1] = fast_exp(lane[0] - best[0])
            weight[0] = lane[1]
            out[b, h, g, T.ramp(0, 1, dim)] = T.broadcast(lane[1], dim) * v[b, h, T.ramp(0, 1, dim)]
            for c in range(_chunks(past)):
                lane[2] = fast_exp(peak[(b * kv + h) * _chunks(past) + c, g] - best[0])
                weight[0] = weight[0] + lane[2] * total[(b * kv + h) * _chunks(past) + c, g]
                out[b, h, g, T.ramp(0, 1, dim)] = out[b, h, g, T.ramp(0, 1, dim)] + T.broadcast(lane[2], dim) * _summed(
                    acc, vs, (b * kv + h) * _chunks(past) + c, g, h)
            out[b, h, g, T.ramp(0, 1, dim)] = out[b, h, g, T.ramp(0, 1, dim)] / T.broadcast(weight[0], dim)

    if scaled:
        @T.prim_func(private=True)
        def decode_attention(q_h: T.handle, k_h: T.handle, v_h: T.handle, pk_h: T.handle, pv_h: T.handle,
                             ks_h: T.handle, vs_h: T.handle, out_h: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, RULE_ATTR: ATTENTION_RULE})
            batch = T.int64()
            past = T.int64()
            q = T.match_buffer(q_h, (batch, kv, groups, dim), "float32")
            k = T.match_buffer(k_h, (batch, kv, dim), "float32")
            v = T.match_buffer(v_h, (batch, kv, dim), "float32")
            pk = T.match_buffer(pk_h, (past, layers, batch, heads, dim), "int8")
            pv = T.match_buffer(pv_h, (past, layers, batch, heads, dim), "int8")
            ks = T.match_buffer(ks_h, (layers, heads, dim), "float32")
            vs = T.match_buffer(vs_h, (layers, heads, dim), "float32")
            out = T.match_buffer(out_h, (batch, kv, groups, dim), "float32")
            body(batch, past, q, k, v, pk, pv, ks, vs, out)
    else:
        @T.prim_func(private=True)
        def decode_attention(q_h: T.handle, k_h: T.handle, v_h: T.handle, pk_h: T.handle, pv_h: T.handle, out_h: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, RULE_ATTR: ATTENTION_RULE})
            batch = T.int64()
            past = T.int64()
            q = T.match_buffer(q_h, (batch, kv, groups, dim), "float32")
            k = T.match_buffer(k_h, (batch, kv, dim), "float32")
            v = T.match_buffer(v_h, (batch, kv, dim), "float32")
            pk = T.match_buffer(pk_h, (past, layers, batch, heads, dim), cache_dtype)
            pv = T.match_buffer(pv_h, (past, layers, batch, heads, dim), cache_dtype)
            out = T.match_buffer(out_h, (batch, kv, groups, dim), "float32")
            body(batch, past, q, k, v, pk, pv, None, None, out)

    return decode_attention


def _convert(node: Any, importer: Any) -> relax.Var:
    builder = importer.block_builder
    q, k, v, past_k, past_v = importer.retrieve_args(node)[:5]
    layer, head_offset, scale = node.args[5:8]
    batch, kv, groups, dim = q.ty.shape.values
    caches = []
    for cache in (past_k, past_v):
        shape = list(cache.ty.shape.values)
        # A ragged cache [P, B, H, D] as a one-layer stack: a view, no copy.
        caches.append(builder.emit(relax.op.reshape(cache, [shape[0], 1, *shape[1:]])) if len(shape) == 4 else cache)
    stacked = list(caches[0].ty.shape.values)
    # An int8 cache's scales: stacked [L, H, D], ragged [H, D] (as a one-layer stack).
    scales = [s if len(s.ty.shape.values) == 3 else builder.emit(relax.op.expand_dims(s, 0))
              for s in importer.retrieve_args(node)[8:10] if s is not None]
    func = decode_attention_func(int(kv), int(groups), int(dim), int(stacked[1]), int(stacked[3]), str(caches[0].ty.dtype),
                                 int(layer), int(head_offset), float(scale))
    gvar = builder.add_func(func, "decode_attention")
    return builder.emit(relax.call_tir(gvar, [q, k, v, *caches, *scales], relax.TensorType(q.ty.shape, "float32")))


def attention_converters() -> dict[str, Any]:
    """The TVM importer's converter for edgec::decode_attention (custom_convert_map)."""
    return {"decode_attention.default": _convert}


def attention_calls(mod: Any) -> int:
    """Calls of decode attention kernels in a Relax module's main."""
    return len(rule_calls(mod, ATTENTION_RULE))
