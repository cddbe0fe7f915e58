"""Checking an artifact's ed25519 signature, anywhere: on the host (`verify --trust`) and
on the device by the agent, before anything of the artifact runs there.

Standard library only, plus `cryptography` imported when a check is asked for: this
file is uploaded to devices beside agent.py. The signature is `signature.json` in the
artifact: an ed25519 signature of the exact bytes of manifest.json, which lists every
other file's sha256, so it covers the whole artifact once the hashes are checked too.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

SIGNATURE = "signature.json"
MANIFEST = "manifest.json"


def fingerprint(public_hex: str) -> str:
    """A short name for a public key (raw 32 bytes, hex): the first 16 hex of its sha256."""
    try:
        return "ed25519:" + hashlib.sha256(bytes.fromhex(public_hex)).hexdigest()[:16]
    except (TypeError, ValueError):
        return "ed25519:(malformed)"


def signature_problem(root: Path, trusted_hex: str) -> str | None:
    """None if the artifact at `root` is signed by the trusted key; else why not, in words."""
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    except ImportError:
        return "this machine cannot check ed25519 signatures: its Python has no `cryptography` package"
    try:
        record = json.loads((root / SIGNATURE).read_text())
    except FileNotFoundError:
        return f"the artifact is not signed (no {SIGNATURE}); sign it with `edgec sign ARTIFACT --key KEY`"
    except (OSError, ValueError):
        return f"{SIGNATURE} is not readable JSON"
    if not isinstance(record, dict) or record.get("algorithm") != "ed25519":
        return f"{SIGNATURE} is not an ed25519 signature"
    signer = str(record.get("public_key", ""))
    if signer != trusted_hex:
        return f"signed by {fingerprint(signer)}, not by the trusted key {fingerprint(trusted_hex)}"
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(trusted_hex))
        key.verify(bytes.fromhex(str(record.get("signature", ""))), (root / MANIFEST).read_bytes())
    except (InvalidSignature, ValueError):
        return f"the signature does not match {MANIFEST}: the manifest changed after it was signed"
    return None
