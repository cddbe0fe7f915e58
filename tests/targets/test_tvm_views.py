"""A decode step reads the KV cache where it lies: the batched attention matmuls of a GQA
decode entry read the cache's layers through index arithmetic (targets/tvm_views)
instead of copying them (take, transpose, broadcast over the group), the result matches
torch, and the CPU rules schedule the new kernels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
from tvm import relax, te
from tvm.relax.frontend.torch import from_exported_program
from tvm.script import relax as R

from edgec.model import FAMILY_CAUSAL_LM, ModelHandle
from edgec.targets.export import export_entries
from edgec.targets.registry import resolve_target
from edgec.targets.tvm_schedule import (
    CpuScheduleConfig,
    finish_pipeline,
    fused_module,
    loop_kinds,
    schedule_fused,
    schedule_prim_func,
    schedule_report,
)
from edgec.targets.tvm_views import SCORES_RULE, VIEW_MATMUL_BLOCK, read_views_in_place
from tests.conftest import TINY_CONFIG, make_tiny_llama

pytestmark = pytest.mark.compile


def _decode_module(cache_dtype: str = "float32") -> tuple[tvm.IRModule, list[tvm.runtime.Tensor], object]:
    handle = ModelHandle("tiny", FAMILY_CAUSAL_LM, "LlamaForCausalLM", Path("."), "0" * 64, module=make_tiny_llama())
    handle.prepared["cache_dtype"] = cache_dtype
    decode = next(entry for entry in export_entries(handle) if entry.name == "decode")
    mod, params = relax.frontend.detach_params(from_exported_program(decode.program, keep_params_as_input=True))
    return mod, params["main"], decode


def _calls(func: relax.Function, op_name: str) -> list[relax.Call]:
    op = tvm.ir.Op.get(op_name)
    found: list[relax.Call] = []
    relax.analysis.post_order_visit(func, lambda e: found.append(e) if isinstance(e, relax.Call) and e.op.same_as(op) else None)
    return found


@pytest.mark.parametrize("cache_dtype", ["float32", "float16"])
def test_gqa_decode_reads_the_cache_in_place_and_matches_torch(cache_dtype: str) -> None:
    mod, params, decode = _decode_module(cache_dtype)
    rewritten, count = read_views_in_place(mod)
    layers = TINY_CONFIG["num_hidden_layers"]
    # Per layer: scores against the past and the new keys, and values of the past; the one
    # new key of a decode step weighs its value by a product, not a matmul of extent 1.
    assert decode.example[0].shape[-1] == 1
    assert count == 3 * layers
    main = rewritten["main"]
    past = set(main.params[1:3])
    # The cache is only read by the attention kernels, and never copied: decode returns only
    # the new position, which the runtime appends in place (before, a concat per step).
    readers = [c for c in _calls(main, "relax.call_tir") if any(a in past for a in c.args[1].fields)]
    assert len(readers) == 2 * layers  # each layer: scores over past K, values over past V
    assert not [c for c in _calls(main, "relax.take") if c.args[0] in past]
    assert not [c for c in _calls(main, "relax.broadcast_to")]
    assert not [c for c in _calls(main, "relax.concat") if any(f in past for f in c.args[0].fields)]
    # A float16 cache is converted as the attention kernels read it, not by a cast of the whole cache.
    assert {str(p.ty.dtype) for p in past} == {cache_dtype}
    assert not [c for c in _calls(main, "relax.astype") if c.args[0] in past]
    new_k = main.ret_ty.fields[1].shape.values  # [new positions, layers, batch, KV heads, head dim]
    assert [int(new_k[n]) for n in (0, 1, 3, 4)] == [1, layers, TINY_CONFIG["num_key_value_heads"], 16]
    assert str(main.ret_ty.fields[1].dtype) == str(main.ret_ty.fields[2].dtype) == cache_dtype

    target = tvm.target.Target(resolve_target("cpu", "tvm").tvm_target)
    fused = fused_module(rewritten, target)
    # No kernel writes a tensor of the cache's size: the only ones whose output grows with
    # the context are attention's scores and probabilities, one value per past position.
    head_dim = TINY_CONFIG["hidden_size"] // TINY_CONFIG["num_attention_heads"]
    context = main.params[1].ty.shape.values[0]
    for call in _calls(fused["main"], "relax.call_tir"):
        dims = list(call.ty.shape.values) if getattr(call.ty, "shape", None) is not None else []
        grows = any(any(v.same_as(context) for v in tvm.tirx.analysis.undefined_vars(d)) for d in dims
                    if not isinstance(d, tvm.tirx.IntImm))
        assert not (grows and head_dim in [int(d) for d in dims if isinstance(d, tvm.tirx.IntImm)]), (call.args[0], dims)
    scheduled = schedule_fused(fused, target)
    report = schedule_report(scheduled)
    views = {name: rule for name, rule in report.items() if name.startswith(VIEW_MATMUL_BLOCK)}
    assert len(views) >= 4, report
    for name, rule in views.items():
        # Scores over the cache (lane-wise products summed by a tree), dot products with the
        # new key (the reduction rule), a register tile (P @ V), or one product.
        assert rule in (SCORES_RULE, "reduction+rfactor", "matmul", "injective"), (name, rule)
        assert "parallel" in loop_kinds(scheduled[name]) or rule == "injective", (name, loop_kinds(scheduled[name]))
        if rule == SCORES_RULE:
            assert {"parallel", "vectorized", "unrolled"} <= loop_kinds(scheduled[name]), loop_kinds(scheduled[name])
    assert list(views.values()).count(SCORES_RULE) == layers and "matmul" in views.values(), views

    vm = relax.VirtualMachine(tvm.compile(scheduled, target, relax_pipeline=finish_pipeline(target)), tvm.cpu())
    example = decode.example
    got = vm["main"](*[tvm.runtime.tensor(t.numpy()) for t in example], *params)
    with torch.no_grad():
        want = decode.module(*example)
    for ours, theirs in zip(got, want):
        # float16 k and v: one rounding of the same float32 values, which may differ in their last bit
        tolerance = {"rtol": 1e-3, "atol": 1e-3} if ours.dtype == "float16" else {"rtol": 1e-4, "atol": 1e-5}
        assert ours.dtype == str(theirs.dtype).removeprefix("torch.")
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), **tolerance)


def test_a_matmul_that_copies_nothing_is_left_alone() -> None:
    builder = relax.BlockBuilder()
    a, b = relax.Var("a", R.Tensor((2, 4, 8), "float32")), relax.Var("b", R.Tensor((2, 8, 16), "float32"))
    with builder.function("main", [a, b]):
        with builder.dataflow():
            out = builder.emit_output(relax.op.matmul(a, b))
        builder.emit_func_output(out)
    rewritten, count = read_views_in_place(builder.get())
    assert count == 0
    assert len(_calls(rewritten["main"], "relax.matmul")) == 1


def test_a_matmul_reading_one_head_of_a_stacked_tensor_is_exact_when_its_rows_are_padded() -> None:
    """TVM's pad_einsum mis-pads an operand read at an offset (head 2 of 4, as a view
    matmul reads one calibrated head): the matmul rule must not pad such a kernel."""
    batch, seq = tvm.tirx.Var("b", "int64"), tvm.tirx.Var("s", "int64")
    earlier = te.placeholder((seq, seq), name="earlier")
    probs = te.placeholder((batch, 4, seq, seq), name="probs")
    k = te.reduce_axis((0, seq), name="k")
    out = te.compute((batch, 1, seq, seq), lambda b, h, i, j: te.sum(earlier[i, k] * probs[b, h + 2, k, j], axis=k),
                     name=VIEW_MATMUL_BLOCK)
    target = tvm.target.Target(resolve_target("cpu", "tvm").tvm_target)
    scheduled, rule = schedule_prim_func(te.create_prim_func([earlier, probs, out]), CpuScheduleConfig.from_target(target))
    assert rule.startswith("matmul") and rule != "matmul+pad", rule
    library = tvm.compile(tvm.IRModule({"main": scheduled}), target=target)
    rng = np.random.default_rng(0)
    lower = np.tril(np.ones((13, 13), dtype=np.float32))  # 13 rows: not a whole register tile
    values = rng.random((2, 4, 13, 13), dtype=np.float32)
    result = tvm.runtime.tensor(np.zeros((2, 1, 13, 13), dtype=np.float32))
    library["main"](tvm.runtime.tensor(lower), tvm.runtime.tensor(values), result)
    np.testing.assert_allclose(result.numpy(), lower @ values[:, 2:3], rtol=1e-5, atol=1e-5)
