"""One decode step's attention over an appended KV cache, as one op.

`edgec::decode_attention` takes the new position's queries (grouped by KV head), its key
and value, and the whole cache as the runner keeps it (position-major, possibly float16, or int8
with a fixed scale per layer, head and channel: `k_scale`, `v_scale`), and returns the
attention output. Its torch body is the reference (eager runs, parity
references); backends that have a kernel for it (targets/tvm_attention) lower the node
to that kernel, which reads each layer's K and V once, where they lie. Entries emit it
only where every target has such a kernel (Capability.attention_kernel) and only for
plain attention: no mask, no soft-capping, no calibrated heads, float32 compute
(edgec.lm decides).
"""

from __future__ import annotations

import torch

__all__ = ["HEAD_DIM_MULTIPLE", "decode_attention", "dequantized"]

# The kernels sum a score's head-dim product in 16 lanes: other head dims keep the matmuls.
HEAD_DIM_MULTIPLE = 16


def layer_view(cache: torch.Tensor, layer: int, head_offset: int, kv_heads: int) -> torch.Tensor:
    """One layer's [P, B, KV, D] of a stacked [P, L, B, H, D] or ragged [P, B, H, D] cache."""
    stacked = cache[:, layer] if cache.dim() == 5 else cache
    return stacked[:, :, head_offset : head_offset + kv_heads]


def dequantized(cache: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """A cache in `dtype`: an int8 one times its scale (the cache's shape without its
    tokens and batch axes: stacked [L, H, D], ragged [H, D]), a float one converted."""
    if scale is None:
        return cache.to(dtype)
    return cache.to(dtype) * (scale[:, None] if cache.dim() == 5 else scale).to(dtype)


@torch.library.custom_op("edgec::decode_attention", mutates_args=())
def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    past_k: torch.Tensor,
    past_v: torch.Tensor,
    layer: int,
    head_offset: int,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(scale * q @ [K_past; k]^T) @ [V_past; v] per KV head and its group of query heads.

    q [B, KV, G, D]; k, v [B, KV, D] (the new position); past_k, past_v: the cache,
    stacked [P, L, B, H, D] (this layer: `layer`) or ragged [P, B, H, D] (this layer's
    heads from `head_offset`), in any float dtype, or int8 with `k_scale`, `v_scale`
    (stacked [L, H, D], ragged [H, D]). Returns [B, KV, G, D] in q's dtype."""
    kv_heads = q.shape[1]

    def layer_of(cache: torch.Tensor, cache_scale: torch.Tensor | None) -> torch.Tensor:  # [B, KV, P, D] in q's dtype
        view = layer_view(cache, layer, head_offset, kv_heads)
        if cache_scale is not None:  # this layer's heads of the scale, as the view takes them of the cache
            stacked = cache_scale[layer] if cache.dim() == 5 else cache_scale
            return dequantized(view, stacked[head_offset : head_offset + kv_heads], q.dtype).permute(1, 2, 0, 3)
        return view.permute(1, 2, 0, 3).to(q.dtype)

    keys, values = layer_of(past_k, k_scale), layer_of(past_v, v_scale)
    keys = torch.cat((keys, k[:, :, None]), dim=2)
    values = torch.cat((values, v[:, :, None]), dim=2)
    probs = torch.softmax(torch.matmul(q, keys.transpose(2, 3)) * scale, dim=-1)  # [B, KV, G, P + 1]
    return torch.matmul(probs, values)


@decode_attention.register_fake
def _decode_attention_shape(q, k, v, past_k, past_v, layer, head_offset, scale, k_scale=None, v_scale=None):  # type: ignore[no-untyped-def]
    return q.new_empty(q.shape)
