"""`edgec profile`: latency, load time, memory and per-op time of an artifact on a device.

The device-side agent measures (targets/agent.py `profile`); this side uploads,
labels the figures (emulated or not), draws the per-op chart and compares with
an earlier result file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgec.deploy import upload_and_check
from edgec.errors import BadInputError

EMULATION_NOTE = "emulated (qemu-user on x86-64): proves the code runs; these are not ARM performance figures"


def profile_artifact(
    root: Path,
    device: str,
    runs: int,
    warmup: int,
    prompt_len: int,
    new_tokens: int,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    if runs < 1:
        raise BadInputError(f"--runs {runs}: profile needs at least one timed run")
    if warmup < 0 or prompt_len < 1 or new_tokens < 0:
        raise BadInputError("--warmup and --new-tokens must be >= 0 and --prompt-len >= 1")
    session = upload_and_check(root, device, progress)
    max_context = session.manifest.get("lm", {}).get("max_context")
    if max_context is not None and prompt_len + new_tokens > max_context:
        raise BadInputError(f"--prompt-len + --new-tokens = {prompt_len + new_tokens} exceeds the artifact's max context {max_context}")
    progress(f"{device}: {warmup} warm-up + {runs} timed runs (emulated: slow)")
    measured = session.agent("profile", str(runs), str(warmup), str(prompt_len), str(new_tokens))
    return {
        "artifact": str(root),
        "device": device,
        "backend": session.manifest["backend"],
        "emulated": True,
        "note": EMULATION_NOTE,
        "size_bytes": session.manifest["size_bytes"],
        **measured,
    }


def plot_per_op(result: dict[str, Any], path: Path, top: int = 15) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = sorted(result["per_op_ms"].items(), key=lambda kv: -kv[1])[:top]
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(items) + 1.5))
    ax.barh([name[:48] for name, _ in reversed(items)], [ms for _, ms in reversed(items)], color="#4477aa")
    ax.set_xlabel("time per run (ms)")
    label = "EMULATED - not ARM performance" if result.get("emulated") else result["device"]
    ax.set_title(f"{Path(result['artifact']).name} on {result['device']}: {result['entry']} per-op time ({label})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(result: dict[str, Any], old_path: Path) -> dict[str, float]:
    try:
        old = json.loads(old_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BadInputError(f"--compare {old_path}: not a readable profile result ({exc})") from None
    if "latency" not in old:
        raise BadInputError(f"--compare {old_path}: not an edgec profile result (no 'latency')")
    ratios = {f"latency {key} (new/old)": result["latency"][key] / old["latency"][key] for key in ("p50_ms", "p90_ms", "mean_ms") if old["latency"].get(key)}
    if result.get("decode_tokens_per_s") and old.get("decode_tokens_per_s"):
        ratios["decode tokens/s (new/old)"] = result["decode_tokens_per_s"] / old["decode_tokens_per_s"]
    if old.get("load_ms"):
        ratios["load (new/old)"] = result["load_ms"] / old["load_ms"]
    return ratios
