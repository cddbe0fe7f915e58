"""schedule: Edge-LLM's hardware scheduling -- a measured kernel choice per layer workload.

Before: every TVM kernel gets edgec's rule-based CPU schedule (one template per kind).
After: for each distinct matmul workload (shape, bits, group, sparsity pattern) of each
entry, candidate schedules are timed on the real target and the fastest is compiled;
measurements persist in a per-target tuning database, so a second compile of the same
model measures nothing. The work happens inside the TVM build (targets/tvm_tuning.py),
where the kernels exist; this pass checks the options and the device, and leaves the
model as is.
Host builds are timed on the host unless `device` names a TVM RPC server; cross builds
only on such a server on a real board. The emulated arm64 device is refused for timing
(its timings are not ARM performance); without a device a cross build keeps its
templates and the record says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from edgec.errors import BadInputError
from edgec.model import FAMILY_CAUSAL_LM, FAMILY_ENCODER, FAMILY_EXPORTED, FAMILY_ONNX, ModelHandle
from edgec.pipeline import PassContext, PassResult
from edgec.recipe import LayerOverride
from edgec.targets.devices import RpcEndpoint, parse_device


class ScheduleOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    trials: int = Field(6, ge=0, description="candidate schedules timed per workload and entry; 0 = templates only")
    prefill_rows: int = Field(128, ge=1, description="rows (tokens) the prefill kernels are timed at")
    activations: Literal["float32", "int8"] = Field(
        "float32",
        description="int8: linears with 4- or 8-bit weights quantize their inputs to int8 per weight group "
        "(llama.cpp's Q8 activations) and use integer dot products (AVX-512 VNNI, Arm dotprod) where the target "
        "has them; faster, but not the float result: check perplexity, and the parity tolerance (parity.rtol)",
    )
    device: str | None = Field(
        None,
        description="time the kernels on this TVM RPC server (rpc://host:port?key=K&arch=A or tracker://host:port?key=K) "
        "instead of this host; the only way to tune a cross target. Not the emulated device",
    )


class Schedule:
    """Measured per-workload kernel choice in the TVM build, with a reusable tuning database."""

    name: ClassVar[str] = "schedule"
    families: ClassVar[tuple[str, ...]] = (FAMILY_CAUSAL_LM, FAMILY_EXPORTED, FAMILY_ONNX, FAMILY_ENCODER)
    Options: ClassVar[type[BaseModel]] = ScheduleOptions
    summary: ClassVar[str] = "Edge-LLM hardware scheduling: time candidate kernels per layer workload, keep the fastest"

    def __init__(self, options: BaseModel, overrides: Sequence[LayerOverride]) -> None:
        assert isinstance(options, ScheduleOptions)
        self.options = options

    def run(self, model: ModelHandle, ctx: PassContext) -> PassResult:
        del model
        where = "the TVM build" if ctx.recipe.backend == "tvm" else "nothing (ONNX Runtime chooses its own kernels)"
        return PassResult(changed=False, record={"trials": self.options.trials, "applied_in": where})


def tuning_endpoint(spec: str, arch: str, target_name: str) -> RpcEndpoint:
    """The TVM RPC endpoint `schedule.device` names, checked: a stock server (the board
    runs `python3 -m tvm.exec.rpc_server`) of the target's architecture, not the emulated
    device, reachable now."""
    from edgec.targets.device_rpc import emulated, reachable

    device = parse_device(spec)
    if not isinstance(device, RpcEndpoint):
        raise BadInputError(
            f"schedule.device {spec}: kernels are timed over TVM RPC; start `python3 -m tvm.exec.rpc_server` on the board "
            "and give rpc://HOST:PORT?key=K (or tracker://HOST:PORT?key=K)"
        )
    if device.arch != arch:
        raise BadInputError(
            f"schedule.device {spec} is {device.arch} (arch= in the URI; aarch64 if absent) but target {target_name} is "
            f"{arch}; tune on a device of the target's architecture"
        )
    if emulated(device):
        raise BadInputError(
            f"schedule.device {spec}: that server runs in the emulated arm64 device, whose timings are not ARM "
            "performance; tune on a real board, or set schedule.trials=0 to keep the templates"
        )
    reachable(device)
    return device


def schedule_options(passes: Sequence[object]) -> ScheduleOptions | None:
    """The schedule pass's options if the recipe lists it."""
    for spec in passes:
        if getattr(spec, "name", None) == Schedule.name:
            return ScheduleOptions.model_validate(getattr(spec, "options", {}))
    return None
