from typing import ClassVar

import pytest
from pydantic import BaseModel

from edgec.errors import BadInputError, UnsupportedError
from edgec.model import FAMILY_CAUSAL_LM, FAMILY_EXPORTED, ModelHandle
from edgec.pipeline import PassContext, PassFailed, PassManager, PassResult, options_for_module, override_matches
from edgec.recipe import LayerOverride, PassSpec, Recipe


class NoOptions(BaseModel):
    scale: float = 1.0


class Marker:
    name: ClassVar[str] = "marker"
    families: ClassVar[tuple[str, ...]] = (FAMILY_CAUSAL_LM,)
    Options: ClassVar[type[BaseModel]] = NoOptions
    summary: ClassVar[str] = "records that it ran"

    def __init__(self, options: BaseModel, overrides: list[LayerOverride]) -> None:
        self.options = options

    def run(self, model: ModelHandle, ctx: PassContext) -> PassResult:
        model.info.setdefault("ran", []).append(self.name)
        return PassResult(True, {"scale": self.options.scale})


class Broken(Marker):
    name: ClassVar[str] = "broken"

    def run(self, model: ModelHandle, ctx: PassContext) -> PassResult:
        raise BadInputError("layer 3 has no weights")


REGISTRY = {"marker": Marker, "broken": Broken}


def handle(family: str = FAMILY_CAUSAL_LM) -> ModelHandle:
    from pathlib import Path

    return ModelHandle("m", family, "LlamaForCausalLM", Path("."), "0" * 64)


def test_passes_run_in_order_with_timings_and_records() -> None:
    model = handle()
    manager = PassManager(REGISTRY, [PassSpec(name="marker", options={"scale": 2.0}), PassSpec(name="marker")])
    log = manager.run(model, PassContext(recipe=Recipe()))
    assert [e.record["scale"] for e in log] == [2.0, 1.0]
    assert model.info["ran"] == ["marker", "marker"] and all(e.seconds >= 0 for e in log)


def test_failure_names_the_pass_and_what_ran_before() -> None:
    manager = PassManager(REGISTRY, [PassSpec(name="marker"), PassSpec(name="broken")])
    with pytest.raises(PassFailed, match=r"pass broken failed after \[marker\]: layer 3 has no weights"):
        manager.run(handle(), PassContext(recipe=Recipe()))


def test_wrong_family_is_refused_before_any_pass_runs() -> None:
    model = handle(FAMILY_EXPORTED)
    manager = PassManager(REGISTRY, [PassSpec(name="marker")])
    with pytest.raises(UnsupportedError, match=r"pass marker does not apply to m \(family exported-program\); it accepts: causal-lm"):
        manager.run(model, PassContext(recipe=Recipe()))
    assert "ran" not in model.info


def test_overrides_match_by_index_range_and_glob() -> None:
    assert override_matches(3, "model.layers.3.mlp.up_proj")
    assert not override_matches(3, "model.layers.13.mlp.up_proj")
    assert override_matches("2-4", "model.layers.4.self_attn.q_proj")
    assert not override_matches("2-4", "lm_head")
    assert override_matches("*.mlp.*", "model.layers.0.mlp.down_proj")
    overrides = [LayerOverride(match="0-1", options={"scale": 3.0}), LayerOverride(match=1, options={"scale": 4.0})]
    assert options_for_module(NoOptions(), overrides, "model.layers.1.mlp").scale == 4.0
    assert options_for_module(NoOptions(), overrides, "model.layers.0.mlp").scale == 3.0
    assert options_for_module(NoOptions(), overrides, "lm_head").scale == 1.0
