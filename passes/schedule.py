"""schedule: Edge-LLM's hardware scheduling -- a measured kernel choice per layer workload.

Before: every TVM kernel gets edgec's rule-based CPU schedule (one template per kind).
After: for each distinct matmul workload (shape, bits, group, sparsity pattern) of each
entry, candidate schedules are timed on the real target and the fastest is compiled;
measurements persist in a per-target tuning database, so a second compile of the same
model measures nothing. The work happens inside the TVM build (targets/tvm_tuning.py),
where the kernels exist; this pass validates the options and leaves the model as is.
Cross targets are not tuned here: the emulated arm64 device's timings are not ARM
performance, so their templates are kept and the record says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from edgec.model import FAMILY_CAUSAL_LM, FAMILY_EXPORTED, FAMILY_ONNX, ModelHandle
from edgec.pipeline import PassContext, PassResult
from edgec.recipe import LayerOverride


class ScheduleOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    trials: int = Field(6, ge=0, description="candidate schedules timed per workload and entry; 0 = templates only")
    prefill_rows: int = Field(128, ge=1, description="rows (tokens) the prefill kernels are timed at")


class Schedule:
    """Measured per-workload kernel choice in the TVM build, with a reusable tuning database."""

    name: ClassVar[str] = "schedule"
    families: ClassVar[tuple[str, ...]] = (FAMILY_CAUSAL_LM, FAMILY_EXPORTED, FAMILY_ONNX)
    Options: ClassVar[type[BaseModel]] = ScheduleOptions
    summary: ClassVar[str] = "Edge-LLM hardware scheduling: time candidate kernels per layer workload, keep the fastest"

    def __init__(self, options: BaseModel, overrides: Sequence[LayerOverride]) -> None:
        assert isinstance(options, ScheduleOptions)
        self.options = options

    def run(self, model: ModelHandle, ctx: PassContext) -> PassResult:
        del model
        where = "the TVM build" if ctx.recipe.backend == "tvm" else "nothing (ONNX Runtime chooses its own kernels)"
        return PassResult(changed=False, record={"trials": self.options.trials, "applied_in": where})


def schedule_options(passes: Sequence[object]) -> ScheduleOptions | None:
    """The schedule pass's options if the recipe lists it."""
    for spec in passes:
        if getattr(spec, "name", None) == Schedule.name:
            return ScheduleOptions.model_validate(getattr(spec, "options", {}))
    return None
