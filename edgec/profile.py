"""`edgec profile`: latency, load time, memory and per-op time of an artifact on a device.

The device-side agent measures (targets/agent.py `profile`); this side uploads,
labels the figures (emulated or not), draws the per-op chart and compares with
an earlier result file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgec.deploy import DEFAULT_TIMEOUT_S, DeviceDied, check_signature_here, open_device, upload_and_check
from edgec.errors import BadInputError, DeviceUnreachableError
from edgec.targets.devices import RpcEndpoint

EMULATION_NOTE = "emulated (qemu-user on x86-64): proves the code runs; these are not ARM performance figures"


def check_request(runs: int, warmup: int, prompt_len: int, new_tokens: int, max_context: int | None) -> None:
    if runs < 1:
        raise BadInputError(f"--runs {runs}: profile needs at least one timed run")
    if warmup < 0 or prompt_len < 1 or new_tokens < 0:
        raise BadInputError("--warmup and --new-tokens must be >= 0 and --prompt-len >= 1")
    if max_context is not None and prompt_len + new_tokens > max_context:
        raise BadInputError(f"--prompt-len + --new-tokens = {prompt_len + new_tokens} exceeds the artifact's max context {max_context}")


def save_result(result: dict[str, Any], path: Path) -> None:
    """Write a result file completely or not at all (a later --compare reads it)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)


def profile_artifact(
    root: Path,
    device_spec: str,
    runs: int,
    warmup: int,
    prompt_len: int,
    new_tokens: int,
    progress: Callable[[str], None],
    out: Path | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    trusted: str | None = None,
) -> dict[str, Any]:
    """Profile on the device; with `out`, the result file is written, and if the device dies
    mid-profile, what it measured so far is saved there marked "complete": false.
    `timeout_s` bounds each step of the agent (qemu-arm64, ssh://); with `trusted` (an
    ed25519 public key, hex), nothing runs unless the artifact is signed by it."""
    check_request(runs, warmup, prompt_len, new_tokens, None)
    device = open_device(device_spec)
    if isinstance(device, RpcEndpoint):
        from edgec.targets.device_rpc import profile_rpc

        check_signature_here(root, trusted)
        result = profile_rpc(root, device, runs, warmup, prompt_len, new_tokens, progress)
        if out is not None:
            save_result(result, out)
        return result
    session = upload_and_check(root, device, progress, timeout_s, trusted)
    check_request(runs, warmup, prompt_len, new_tokens, session.manifest["program"].get("max_context"))
    slow = " (emulated: slow)" if device.emulated else ""
    progress(f"{device.name}: {warmup} warm-up + {runs} timed runs{slow}")
    header = {
        "artifact": str(root),
        "device": device.name,
        "backend": session.manifest["backend"],
        "emulated": device.emulated,
        "note": EMULATION_NOTE if device.emulated else f"measured on {device.name}",
        "size_bytes": session.manifest["size_bytes"],
    }
    try:
        def loaded(figures: dict[str, Any]) -> None:
            if "load_ms" in figures:
                progress(f"{device.name}: loaded in {figures['load_ms']:.0f} ms; timing")

        measured = session.agent("profile", str(runs), str(warmup), str(prompt_len), str(new_tokens), on_partial=loaded)
    except DeviceDied as died:
        partial = {**header, **died.partial, "complete": False, "error": died.message}
        saved = out or Path(f"edgec-profile-{root.name}-incomplete.json")
        save_result(partial, saved)
        raise DeviceUnreachableError(f"{died.message}; the results measured before that are saved to {saved}, marked incomplete") from None
    result = {**header, **measured, "complete": True}
    if out is not None:
        save_result(result, out)
    return result


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


def read_baseline(old_path: Path) -> dict[str, Any]:
    """The earlier result `--compare` names, read before the device is touched: a typo
    must not cost a whole profiling run."""
    try:
        old = json.loads(old_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInputError(f"--compare {old_path}: not a readable profile result ({exc}); give a file written by `edgec profile --out`") from None
    if not isinstance(old, dict) or not isinstance(old.get("latency"), dict):
        raise BadInputError(f"--compare {old_path}: not an edgec profile result (no 'latency'); give a file written by `edgec profile --out`")
    return old


def compare(result: dict[str, Any], old: dict[str, Any]) -> dict[str, float]:
    ratios = {f"latency {key} (new/old)": result["latency"][key] / old["latency"][key] for key in ("p50_ms", "p90_ms", "mean_ms") if old["latency"].get(key)}
    if result.get("decode_tokens_per_s") and old.get("decode_tokens_per_s"):
        ratios["decode tokens/s (new/old)"] = result["decode_tokens_per_s"] / old["decode_tokens_per_s"]
    # Only like with like: over a stock RPC server there is no load_ms (see library_load_ms).
    if result.get("load_ms") and old.get("load_ms"):
        ratios["load (new/old)"] = result["load_ms"] / old["load_ms"]
    return ratios
