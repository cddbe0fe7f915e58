"""Softmax, sigmoid and SiLU on the CPU compute exp with arithmetic that vectorizes
(targets/tvm_fastmath): the built kernels call no libm expf, and they agree with numpy over
masked scores (-inf), saturating inputs and ordinary ones."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import relax
from tvm.script import relax as R

from edgec.targets.registry import resolve_target
from edgec.targets.tvm_fastmath import fast_nonlinear
from edgec.targets.tvm_schedule import finish_pipeline, fused_module, schedule_fused

pytestmark = pytest.mark.compile


@tvm.script.ir_module
class Nonlinear:
    @R.function
    def main(x: R.Tensor(("n", 100), "float32")):
        with R.dataflow():
            probs = R.nn.softmax(x, axis=-1)
            gate = R.sigmoid(x)
            silu = R.nn.silu(x)
            out = (probs, gate, silu)
            R.output(out)
        return out


def _build(mod: tvm.IRModule) -> relax.VMExecutable:
    target = tvm.target.Target(resolve_target("cpu", "tvm").tvm_target)
    return tvm.compile(schedule_fused(fused_module(mod, target), target), target, relax_pipeline=finish_pipeline(target))


def _calls_expf(executable: relax.VMExecutable) -> bool:
    listing = executable.mod.imports[0].inspect_source("asm")
    return any("expf" in line for line in listing.splitlines() if "call" in line or "jmp" in line)


def test_softmax_sigmoid_and_silu_call_no_libm_exp_and_match_numpy() -> None:
    fast, replaced = fast_nonlinear(Nonlinear)
    assert replaced == {"sigmoid": 1, "silu": 1, "softmax": 1}
    executable = _build(fast)
    assert not _calls_expf(executable)
    assert _calls_expf(_build(Nonlinear))  # TVM's own lowering: one expf call per element

    rng = np.random.default_rng(0)
    x = rng.normal(0, 4, size=(7, 100)).astype(np.float32)
    x[0, 60:] = -np.inf  # a causal mask's row
    x[1] = np.linspace(-120, 120, 100)  # beyond exp's float range both ways
    x[2] = rng.normal(0, 0.01, 100)  # near zero: sigmoid ~ 1/2
    probs, gate, silu = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x))

    wide = x.astype(np.float64)
    shifted = np.exp(wide - wide.max(axis=-1, keepdims=True))
    np.testing.assert_allclose(probs.numpy(), shifted / shifted.sum(axis=-1, keepdims=True), rtol=1e-5, atol=1e-7)
    assert np.all(probs.numpy()[0, 60:] < 1e-30)  # masked scores weigh nothing
    with np.errstate(over="ignore"):
        sigmoid = 1 / (1 + np.exp(-wide))
    np.testing.assert_allclose(gate.numpy(), sigmoid, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(silu.numpy()[1:], wide[1:] * sigmoid[1:], rtol=1e-5, atol=1e-7)


def test_other_dtypes_keep_tvms_exp() -> None:
    @tvm.script.ir_module
    class Half:
        @R.function
        def main(x: R.Tensor((4, 8), "float16")):
            with R.dataflow():
                out = R.nn.softmax(x, axis=-1)
                R.output(out)
            return out

    mod, replaced = fast_nonlinear(Half)
    assert replaced == {}
    assert tvm_ffi.structural_equal(mod["main"], Half["main"])
