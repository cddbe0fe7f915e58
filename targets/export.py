"""torch.export of a model's runnable entries, shared by both backends.

Before: a ModelHandle (after model-level passes).
After: named entries (ExportedPrograms with their dynamic dimensions, or ONNX graphs)
plus the example inputs they were traced with; which entries a model has is its
family's business (edgec.families).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from edgec.model import ModelHandle


@dataclass
class ExportedEntry:
    """One runnable entry: a torch program, or (for .onnx inputs) an ONNX graph."""

    name: str
    program: torch.export.ExportedProgram | None
    module: torch.nn.Module | None
    example: tuple[torch.Tensor, ...]
    dynamic_shapes: tuple[dict[int, Any], ...] | None
    input_names: list[str]
    output_names: list[str]
    onnx_model: Any | None = None
    # Rows (tokens) a matmul sees per call when it is known and fixed (a decode step: 1):
    # kernels are tuned for that shape; None, for the schedule pass's prefill_rows.
    rows_per_call: int | None = None
    # Entries that slice weights other entries also read (`--subnet all`): the TVM backend
    # keeps their weights as stored so every entry reads the one copy.
    shares_weights: bool = False


def export_entries(model: ModelHandle) -> list[ExportedEntry]:
    from edgec.families import family_named

    return family_named(model.family).entries(model)
