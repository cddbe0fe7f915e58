"""`compile --latency-budget-ms X`: the best shape of a search whose decode step fits X
milliseconds on the device, chosen by measuring, not by guessing.

Every shape of the search is compiled once into a `--subnet all` artifact for the target
(edgec.subnet.nested), each shape's prefill and decode step are timed on the device over a
TVM RPC server (a board's, or the emulated device's: `edgec device up qemu-arm64`), and the
shape with the lowest calibration loss among those that fit is compiled as usual. The
measurements (a latency table) and the choice go into the manifest; a stored table
(`--latency-table FILE`: such a manifest, or its `latency_budget.table`) replaces the
measuring.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgec.errors import BadInputError
from edgec.subnet.search import SubnetSearch

TABLE_KIND = "edgec-subnet-latency"
PROMPT_TOKENS = 32
DECODE_STEPS = 8
RUNS = 5


def measure_shapes(artifact: Path, device: str, progress: Callable[[str], None]) -> dict[str, Any]:
    """Prefill and decode-step latency (p50) of every shape of a `--subnet all` artifact on
    `device` (rpc:// or tracker://)."""
    from edgec.artifact import read_manifest
    from edgec.deploy import open_device
    from edgec.targets.device_rpc import emulated, profile_shapes_rpc
    from edgec.targets.devices import RpcEndpoint

    endpoint = open_device(device)
    if not isinstance(endpoint, RpcEndpoint):
        raise BadInputError(f"--device {device}: shapes are timed over a TVM RPC server (rpc:// or tracker://); for the "
                            "emulated device start one with `edgec device up qemu-arm64` and give its rpc:// URI")
    manifest = read_manifest(artifact)
    shapes = profile_shapes_rpc(artifact, endpoint, RUNS, PROMPT_TOKENS, DECODE_STEPS, progress)
    return {"kind": TABLE_KIND, "device": device, "emulated": emulated(endpoint), "target": manifest["target"]["name"],
            "backend": manifest["backend"], "prompt_tokens": PROMPT_TOKENS, "decode_steps_timed": DECODE_STEPS, "shapes": shapes}


def read_table(path: Path, target: str, backend: str) -> dict[str, Any]:
    """A stored latency table: the file itself, or a manifest that recorded one."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BadInputError(f"--latency-table {path}: not a readable JSON file ({exc})") from None
    table = data.get("latency_budget", {}).get("table", data) if isinstance(data, dict) else None
    if not isinstance(table, dict) or table.get("kind") != TABLE_KIND:
        raise BadInputError(f"--latency-table {path}: not a latency table (a manifest with latency_budget, or its table)")
    if (table["target"], table["backend"]) != (target, backend):
        raise BadInputError(f"--latency-table {path}: measured for {table['target']}/{table['backend']}, "
                            f"not {target}/{backend}; measure on this target (--device)")
    return table


def choose(search: SubnetSearch, table: dict[str, Any], budget_ms: float) -> str:
    """The shape with the lowest calibration loss whose decode step fits; refuses a budget
    that no shape meets, naming the fastest."""
    scores = {shape.label(): float(row["score"]) for shape, row in search.shapes()}
    missing = sorted(set(scores) - set(table["shapes"]))
    if missing:
        raise BadInputError(f"the latency table has no measurement of {missing[0]} (of {len(missing)} shapes); "
                            "it was measured for another search: measure again (--device)")
    fits = [label for label in scores if table["shapes"][label]["decode_ms"] <= budget_ms]
    if not fits:
        fastest = min(scores, key=lambda label: table["shapes"][label]["decode_ms"])
        raise BadInputError(f"--latency-budget-ms {budget_ms:g}: no shape's decode step fits on {table['device']}; the fastest, "
                            f"{fastest}, takes {table['shapes'][fastest]['decode_ms']:.2f} ms")
    return min(fits, key=lambda label: (scores[label], label))


def all_shapes_table(model_spec: str, recipe: Any, device: str, progress: Callable[[str], None]) -> dict[str, Any]:
    """Compile every shape into a temporary `--subnet all` artifact and time them on `device`."""
    from edgec.compiler import compile_model

    with tempfile.TemporaryDirectory(prefix="edgec-shapes-") as tmp:
        artifact = Path(tmp) / "all-shapes"
        progress("latency budget: every shape into one artifact, to time them on the device")
        compile_model(model_spec, recipe.model_copy(update={"subnet": "all"}), artifact, False, progress)
        return measure_shapes(artifact, device, progress)
