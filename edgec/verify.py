"""`edgec verify`: hashes against the manifest, then parity where the artifact runs here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgec.artifact import artifact_runs_here, check_hashes, load_reference, open_runtime, read_manifest, self_check
from edgec.parity import check as check_parity
from edgec.targets.signature import SIGNATURE, fingerprint, signature_problem


def verify_artifact(root: Path, trusted: str | None = None) -> dict[str, Any]:
    """`trusted`: an ed25519 public key (hex) the artifact must be signed by."""
    manifest = read_manifest(root, check_self=False)
    checks: list[dict[str, Any]] = []
    problems = self_check(root, manifest)
    checks.append({"name": "manifest", "ok": not problems,
                   "detail": "; ".join(problems) or "digest, tolerance and library architectures agree"})
    hashes = check_hashes(root, manifest)
    problems = [f"changed: {n}" for n in hashes.mismatched] + [f"missing: {n}" for n in hashes.missing]
    problems += [f"not in manifest: {n}" for n in hashes.unexpected]
    checks.append(
        {
            "name": "hashes",
            "ok": hashes.ok,
            "detail": f"{len(manifest['files'])} files match their sha256" if hashes.ok else "; ".join(problems),
        }
    )
    runs, why = artifact_runs_here(manifest)
    if not hashes.ok or problems:
        checks.append({"name": "parity", "ok": None, "detail": "skipped: the artifact does not match its manifest"})
    elif not runs:
        checks.append({"name": "parity", "ok": None, "detail": f"skipped: {why}"})
    else:
        parity = check_parity(open_runtime(root, manifest, check_files=False), manifest, load_reference(root))
        generation = parity.generation
        steps = f"; greedy decode {generation['matched']}/{generation['steps']} tokens as the reference" if generation else ""
        detail = parity.reason if not parity.ok else (
            f"max |diff| {parity.max_abs_diff:.3g} <= tolerance {parity.tolerance:.3g} "
            f"({', '.join(manifest['program']['entries'])} on {manifest['backend']}){steps}"
        )
        checks.append({"name": "parity", "ok": parity.ok, "detail": detail})
    signature = _signature_check(root, trusted)
    if signature is not None:
        checks.append(signature)
    ok = all(check["ok"] is not False for check in checks)
    return {"artifact": str(root), "ok": ok, "checks": checks}


def _signature_check(root: Path, trusted: str | None) -> dict[str, Any] | None:
    """Checked with a trusted key; without one, a signature is named but not checked."""
    if trusted is not None:
        problem = signature_problem(root, trusted)
        return {"name": "signature", "ok": problem is None, "detail": problem or f"manifest.json signed by {fingerprint(trusted)}"}
    try:
        signer = fingerprint(json.loads((root / SIGNATURE).read_text())["public_key"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {"name": "signature", "ok": None, "detail": f"signed by {signer}, not checked: pass --trust KEY.pub"}
