"""The reference run of a compile and the parity check of an artifact against it.

The rule itself lives in edgec.targets.runtime (PARITY_RULE), shared with the device
agent and the RPC runner so that a check means the same everywhere; the reference
inputs and outputs come from the model's family (edgec.families).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from edgec.model import ModelHandle
from edgec.recipe import Recipe
from edgec.targets.export import ExportedEntry
from edgec.targets.runtime import Runs, check_parity


def reference_io(model: ModelHandle, entries: list[ExportedEntry], recipe: Recipe) -> dict[str, list[np.ndarray]]:
    """{"<entry>.in": [...], "<entry>.out": [...]} (and a generate program's checks) from the family."""
    from edgec.families import family_named

    return family_named(model.family).reference(model, entries, recipe)


def flatten_io(io: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    return {f"{key}.{i}": value for key, values in io.items() for i, value in enumerate(values)}


@dataclass
class ParityResult:
    ok: bool | None
    max_abs_diff: float | None
    tolerance: float | None
    rtol: float
    reason: str = ""
    outputs: list[dict[str, Any]] = field(default_factory=list)
    generation: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_report(cls, report: dict[str, Any], reason: str | None = None) -> ParityResult:
        """From the shared rule's report (here, from the agent, or over RPC)."""
        return cls(
            report["ok"], report["max_abs_diff"], report["tolerance"], float(report["rtol"]),
            report["reason"] if reason is None or not report["ok"] else reason,
            list(report.get("outputs", [])), report.get("generation"),
        )


def check(runner: Runs, manifest: dict[str, Any], reference: dict[str, np.ndarray]) -> ParityResult:
    """The parity rule for an artifact's manifest on any runner."""
    tolerance = manifest["reference"]["tolerance"]
    return ParityResult.from_report(check_parity(runner, manifest["program"], reference, float(tolerance["rtol"]),
                                                 float(tolerance.get("atol", 0.0))))
