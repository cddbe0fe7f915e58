"""Every kernel of a real LM build is scheduled: the prefill and decode entries of a
tiny Llama, after edgec's CPU schedule pass, carry the loop structure each rule promises."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import tvm
from tvm import relax
from tvm.relax.frontend.torch import from_exported_program

from edgec.model import FAMILY_CAUSAL_LM, ModelHandle
from edgec.targets.export import export_entries
from edgec.targets.registry import resolve_target
from edgec.targets.tvm_schedule import loop_kinds, schedule_report, scheduled_module
from tests.conftest import make_tiny_llama

pytestmark = pytest.mark.compile


@pytest.mark.parametrize("target_name", ["cpu", "arm64"])
def test_every_kernel_of_prefill_and_decode_is_scheduled(target_name: str) -> None:
    handle = ModelHandle("tiny", FAMILY_CAUSAL_LM, "LlamaForCausalLM", Path("."), "0" * 64, module=make_tiny_llama())
    target = tvm.target.Target(resolve_target(target_name, "tvm").tvm_target)
    for entry in export_entries(handle):
        mod, _ = relax.frontend.detach_params(from_exported_program(entry.program, keep_params_as_input=True))
        scheduled = scheduled_module(mod, target)
        report = schedule_report(scheduled)
        assert len(report) > 20
        for name, rule in report.items():
            kinds = loop_kinds(scheduled[name])
            assert rule not in ("none", "unscheduled"), (entry.name, name)
            if rule.startswith("matmul"):
                # register-tiled: parallel tiles, unrolled micro-kernel, vector lanes
                assert {"parallel", "vectorized", "unrolled"} <= kinds, (entry.name, name, kinds)
            elif rule in ("injective", "reduction+rfactor"):
                assert "vectorized" in kinds, (entry.name, name, kinds)
            else:
                # symbolic innermost extents (attention over the key length): parallel rows,
                # the inner loop left to LLVM's vectorizer
                assert "parallel" in kinds, (entry.name, name, rule, kinds)
        projections = [n for n, r in report.items() if r.startswith("matmul")]
        assert len(projections) >= 4, report  # q/k/v/o and MLP projections, lm_head


def test_the_exported_decode_program_broadcasts_the_kv_cache_instead_of_repeating_it() -> None:
    """GQA (4 query heads on 2 KV heads): the query heads of a group meet their KV head in a
    matmul that broadcasts over the group. No op of the exported decode program (what both
    backends import) expands or repeats a value whose size grows with the context (the
    cache, once per query head). TVM's importer still lowers the broadcast to one copy."""
    handle = ModelHandle("tiny", FAMILY_CAUSAL_LM, "LlamaForCausalLM", Path("."), "0" * 64, module=make_tiny_llama())
    decode = next(entry for entry in export_entries(handle) if entry.name == "decode")
    ops = [(str(node.target), tuple(node.meta["val"].shape)) for node in decode.program.graph.nodes
           if node.op == "call_function" and isinstance(node.meta.get("val"), torch.Tensor)]
    grows = [(op, shape) for op, shape in ops if any(not isinstance(d, int) for d in shape[1:])]
    assert any("matmul" in op for op, _ in grows), ops  # attention over the cache is there
    copies = [(op, shape) for op, shape in grows if "expand" in op or "repeat" in op]
    assert not copies, copies


def test_decode_kernels_over_one_token_run_serial_and_those_over_the_context_parallel() -> None:
    """A decode step's norms, rotary and activations touch one token's values: a thread
    pool launch costs more than they do, so they are serial; kernels whose size grows
    with the context (softmax, attention) stay parallel, and prefill keeps every kernel
    parallel."""
    from edgec.targets.backend_tvm import _step_batch_vars
    from edgec.targets.tvm_schedule import fused_module, schedule_fused, touches_few_elements

    handle = ModelHandle("tiny", FAMILY_CAUSAL_LM, "LlamaForCausalLM", Path("."), "0" * 64, module=make_tiny_llama())
    target = tvm.target.Target(resolve_target("cpu", "tvm").tvm_target)
    for entry in export_entries(handle):
        mod, _ = relax.frontend.detach_params(from_exported_program(entry.program, keep_params_as_input=True))
        small = _step_batch_vars(mod, entry)
        assert bool(small) == (entry.name == "decode"), (entry.name, small)
        fused = fused_module(mod, target)
        scheduled = schedule_fused(fused, target, None, small)
        report = schedule_report(scheduled)
        serial = {name for name, rule in report.items() if rule.endswith("+serial") or rule == "serial"}
        for name, rule in report.items():
            kinds = loop_kinds(scheduled[name])
            if name in serial:
                assert touches_few_elements(fused[name], small) and "parallel" not in kinds, (entry.name, name, kinds)
            elif not rule.startswith("matmul"):
                assert "parallel" in kinds and not touches_few_elements(fused[name], small), (entry.name, name, rule)
        if entry.name == "decode":
            assert any("rsqrt" in name for name in serial) and any("sigmoid" in name for name in serial), report
            assert any("softmax" in name for name in report) and not any("softmax" in name for name in serial), report
        else:
            assert not serial, report
