"""A decode step's attention is one CPU kernel (targets/tvm_attention): it matches float64
attention over every chunk boundary of the context, for float32, float16 and int8 caches
(with their scales), stacked and ragged, and a tiny Llama's decode entry built with it
matches the matmul entry in torch, with one kernel per layer and no kernel whose output
grows with the context."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
from tvm import relax
from tvm.relax.frontend.torch import from_exported_program

from edgec.decode_attention import decode_attention
from edgec.lm import CausalLMEntries, kv_scales
from edgec.model import FAMILY_CAUSAL_LM, ModelHandle
from edgec.targets.export import export_entries
from edgec.targets.registry import resolve_target
from edgec.targets.tvm_attention import CHUNK, attention_calls, attention_converters, decode_attention_func
from edgec.targets.tvm_schedule import finish_pipeline, fused_module, schedule_fused
from tests.conftest import TINY_CONFIG, make_tiny_llama, parallel_bodies

pytestmark = pytest.mark.compile
TARGET = resolve_target("cpu", "tvm").tvm_target


def _attention_f64(q: np.ndarray, k: np.ndarray, v: np.ndarray, keys: np.ndarray, values: np.ndarray, scale: float) -> np.ndarray:
    """q [B, KV, G, D], k, v [B, KV, D], keys/values [P, B, KV, D] -> [B, KV, G, D], in float64."""
    keys = np.concatenate([keys.astype(np.float64), k[None].astype(np.float64)])
    values = np.concatenate([values.astype(np.float64), v[None].astype(np.float64)])
    scores = np.einsum("bhgd,pbhd->bhgp", q.astype(np.float64), keys) * scale
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    return np.einsum("bhgp,pbhd->bhgd", probs, values)


def _cache(rng: np.random.Generator, shape: tuple[int, ...], spread: float, dtype: str) -> np.ndarray:
    """A random cache in `dtype`: normal values, or for int8 the levels of a scale of 1/32."""
    values = rng.normal(0, spread, shape)
    return np.clip(np.round(values * 32), -127, 127).astype(np.int8) if dtype == "int8" else values.astype(dtype)


@pytest.mark.parametrize("cache_dtype", ["float32", "float16", "int8"])
def test_the_kernel_matches_float64_attention_at_every_chunk_boundary(cache_dtype: str) -> None:
    batch, kv, groups, dim, layers, heads, layer, offset, scale = 2, 2, 3, 32, 3, 5, 1, 2, 0.17
    kernel = decode_attention_func(kv, groups, dim, layers, heads, cache_dtype, layer, offset, scale)
    executable = tvm.compile(tvm.IRModule({"main": kernel.with_attr("global_symbol", "main")}), tvm.target.Target(TARGET))
    # The work items run on the thread pool without a workspace-pool call each, and exp
    # is arithmetic, not libm's expf.
    listing = executable.mod.inspect_source("asm")
    assert "TVMBackendParallelLaunch" in listing
    tasks = parallel_bodies(listing)
    assert "vfmadd" in tasks and "TVMBackendAllocWorkspace" not in tasks
    assert not any("expf" in line for line in listing.splitlines() if "call" in line or "jmp" in line)
    rng = np.random.default_rng(0)
    # An int8 cache's scales: around 1/32 each, different per layer, head and channel.
    scales = [rng.uniform(0.5, 2.0, (layers, heads, dim)).astype(np.float32) / 32 for _ in range(2)] if cache_dtype == "int8" else []
    for past in (0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5):
        q, k, v = (rng.normal(0, 1, shape).astype(np.float32) for shape in ((batch, kv, groups, dim), (batch, kv, dim), (batch, kv, dim)))
        # Scores of a few units, and in the last chunk one far above the rest: the chunks' maxima differ.
        past_k = _cache(rng, (past, layers, batch, heads, dim), 2, cache_dtype)
        past_v = _cache(rng, (past, layers, batch, heads, dim), 1, cache_dtype)
        if past > CHUNK:
            past_k[past - 1, layer, 0, offset] = _cache(rng, (dim,), 0, cache_dtype) + (q[0, 0, 0] * 4).astype(cache_dtype)
        out = tvm.runtime.empty((batch, kv, groups, dim), "float32", tvm.cpu())
        executable["main"](*(tvm.runtime.tensor(x) for x in (q, k, v, past_k, past_v, *scales)), out)
        layer_heads = slice(offset, offset + kv)
        keys, values = past_k[:, layer, :, layer_heads], past_v[:, layer, :, layer_heads]
        if scales:
            keys, values = keys * scales[0][layer, layer_heads], values * scales[1][layer, layer_heads]
        want = _attention_f64(q, k, v, keys, values, scale)
        np.testing.assert_allclose(out.numpy(), want, rtol=2e-5, atol=2e-6, err_msg=f"{past} positions")
        reference = decode_attention(*(torch.from_numpy(x) for x in (q, k, v, past_k, past_v)), layer, offset, scale,
                                     *(torch.from_numpy(x) for x in scales))
        np.testing.assert_allclose(reference.numpy(), want, rtol=2e-5, atol=2e-6)


class _RaggedAttention(torch.nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
        return decode_attention(q, k, v, past_k, past_v, 0, 1, 0.25, k_scale, v_scale)


@pytest.mark.parametrize("cache_dtype", ["float32", "int8"])
def test_a_ragged_cache_is_read_through_the_importer_as_one_layer(cache_dtype: str) -> None:
    batch, kv, groups, dim, total_heads = 1, 2, 2, 16, 4
    rng = np.random.default_rng(1)
    args = [torch.from_numpy(rng.normal(0, 1, shape).astype(np.float32)) for shape in ((batch, kv, groups, dim), (batch, kv, dim), (batch, kv, dim))]
    args += [torch.from_numpy(_cache(rng, (70, batch, total_heads, dim), 1, cache_dtype)) for _ in range(2)]
    # A ragged cache's scales: [H, D].
    scales = [torch.from_numpy(rng.uniform(0.5, 2.0, (total_heads, dim)).astype(np.float32) / 32) for _ in range(2)] if cache_dtype == "int8" else []
    past = torch.export.Dim("past", min=1, max=512)
    program = torch.export.export(_RaggedAttention(), (*args, *scales),
                                  dynamic_shapes=(None, None, None, {0: past}, {0: past}, *[None] * len(scales)))
    mod = from_exported_program(program, custom_convert_map=attention_converters())
    assert attention_calls(mod) == 1
    target = tvm.target.Target(TARGET)
    vm = relax.VirtualMachine(tvm.compile(schedule_fused(fused_module(mod, target), target), target,
                                          relax_pipeline=finish_pipeline(target)), tvm.cpu())
    (got,) = vm["main"](*(tvm.runtime.tensor(a.numpy()) for a in (*args, *scales)))  # the program's outputs, a 1-tuple
    keys, values = args[3].numpy()[:, :, 1:3], args[4].numpy()[:, :, 1:3]
    if scales:
        keys, values = keys * scales[0].numpy()[1:3], values * scales[1].numpy()[1:3]
    want = _attention_f64(*(a.numpy() for a in args[:3]), keys, values, 0.25)
    np.testing.assert_allclose(got.numpy(), want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("cache_dtype", ["float32", "float16", "int8"])
def test_a_tiny_llama_decode_is_one_attention_kernel_per_layer_and_matches_the_matmuls(cache_dtype: str) -> None:
    model = make_tiny_llama()
    handle = ModelHandle("tiny", FAMILY_CAUSAL_LM, "LlamaForCausalLM", Path("."), "0" * 64, module=model)
    vocab = TINY_CONFIG["vocab_size"]
    segments = [[(n * i) % vocab for i in range(40)] for n in (3, 7)]  # the int8 cache's calibration text
    handle.prepared.update(cache_dtype=cache_dtype, attention_op=True, calibration_ids=lambda: segments)
    decode = next(entry for entry in export_entries(handle) if entry.name == "decode")
    mod, params = relax.frontend.detach_params(
        from_exported_program(decode.program, keep_params_as_input=True, custom_convert_map=attention_converters()))
    layers = TINY_CONFIG["num_hidden_layers"]
    assert attention_calls(mod) == layers
    main = mod["main"]
    matmul = tvm.ir.Op.get("relax.matmul")
    found: list[relax.Call] = []
    relax.analysis.post_order_visit(main, lambda e: found.append(e) if isinstance(e, relax.Call) and e.op.same_as(matmul) else None)
    # The linears' matmuls are left (a 2-D weight); no attention matmul (batched over heads) is.
    assert found and all(call.args[1].ty.ndim == 2 for call in found), [call.args[1].ty for call in found]

    target = tvm.target.Target(TARGET)
    scheduled = schedule_fused(fused_module(mod, target), target)
    context = main.params[1].ty.shape.values[0]
    for gvar, func in scheduled.functions_items():
        if isinstance(func, relax.Function):
            continue
        # Only the attention kernel's own scratch may grow with the context: no kernel outputs such a tensor.
        out = func.params[-1]
        grows = any(any(v.same_as(context) or v.name == context.name for v in tvm.tirx.analysis.undefined_vars(d))
                    for d in out.shape if not isinstance(d, tvm.tirx.IntImm))
        assert not grows, gvar.name_hint

    vm = relax.VirtualMachine(tvm.compile(scheduled, target, relax_pipeline=finish_pipeline(target)), tvm.cpu())
    example = decode.example
    got = vm["main"](*[tvm.runtime.tensor(t.numpy()) for t in example], *params["main"])
    scales = kv_scales(CausalLMEntries(model).eval(), segments) if cache_dtype == "int8" else None
    matmuls = CausalLMEntries(model, cache_dtype=getattr(torch, cache_dtype), cache_scales=scales).eval()
    with torch.no_grad():
        want = matmuls.decode(*example)
    for ours, theirs in zip(got, want):
        # int8: a value on a level's edge may round either way.
        tolerance = {"float16": {"rtol": 1e-3, "atol": 1e-3}, "int8": {"rtol": 0, "atol": 1}}.get(ours.dtype, {"rtol": 1e-4, "atol": 1e-5})
        np.testing.assert_allclose(ours.numpy().astype(np.float32), theirs.float().numpy(), **tolerance)
