"""The pass registry: every pass a recipe can name."""

from __future__ import annotations

from pydantic import BaseModel

from edgec.passes.act import Act
from edgec.passes.luc import Luc
from edgec.passes.quantize_weights_int8 import QuantizeWeightsInt8
from edgec.passes.schedule import Schedule
from edgec.pipeline import Pass

REGISTRY: dict[str, type[Pass]] = {
    QuantizeWeightsInt8.name: QuantizeWeightsInt8,
    Luc.name: Luc,
    Schedule.name: Schedule,
    Act.name: Act,
}


def options_for(name: str) -> type[BaseModel] | None:
    cls = REGISTRY.get(name)
    return None if cls is None else cls.Options
