"""Signing artifacts with a user's ed25519 key: `edgec keygen`, `edgec sign`, `compile
--sign`, and the trusted public key that `verify`, `deploy` and `profile --trust` take.

Keys are PEM files as `openssl genpkey -algorithm ed25519` writes them (PKCS#8 private,
SubjectPublicKeyInfo public), unencrypted. The check itself is targets/signature.py,
which the device agent runs too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgec.artifact import MANIFEST
from edgec.errors import BadInputError
from edgec.targets.signature import SIGNATURE, fingerprint


def _raw(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def generate_key(path: Path, force: bool) -> tuple[Path, str]:
    """A new private key at `path` (mode 0600) and its public key at PATH.pub; returns the
    public key's path and fingerprint. Never replaces a key without `force`."""
    public_path = path.with_name(path.name + ".pub")
    for existing in (path, public_path):
        if existing.exists() and not force:
            raise BadInputError(f"{existing} exists; a key is not replaced without --force (what it signed would no longer verify)")
    if not path.parent.is_dir():
        raise BadInputError(f"{path.parent} is not a directory; give a key path in an existing directory")
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as handle:
        handle.write(private)
    os.replace(tmp, path)
    public_path.write_bytes(public)
    return public_path, fingerprint(_raw(key.public_key()))


def _read_key(path: Path, option: str, fix: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BadInputError(f"{option} {path}: cannot read it ({exc.strerror}); {fix}") from None


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The ed25519 private key at `path`, or one line saying what is wrong with it."""
    data = _read_key(path, "--sign", f"make a key with `edgec keygen {path}`")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise BadInputError(f"--sign {path}: the key is encrypted; give an unencrypted PEM key (edgec keygen writes one)") from None
    except ValueError:
        raise BadInputError(f"--sign {path}: not a PEM private key; make one with `edgec keygen {path}` "
                            "or `openssl genpkey -algorithm ed25519`") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BadInputError(f"--sign {path}: not an ed25519 key; edgec signs with ed25519 keys only")
    return key


def trusted_key(path: Path) -> str:
    """The ed25519 public key at `path` (PEM) as raw hex, the form the check takes."""
    data = _read_key(path, "--trust", "give the .pub file `edgec keygen` wrote")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise BadInputError(f"--trust {path}: not a PEM public key; give the .pub file `edgec keygen` wrote") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BadInputError(f"--trust {path}: not an ed25519 key; edgec checks ed25519 signatures only")
    return _raw(key)


def sign_artifact(root: Path, key: Ed25519PrivateKey) -> str:
    """Write ROOT/signature.json, the key's signature of manifest.json; returns the key's
    fingerprint. Written beside and renamed, so a reader never sees half of it."""
    public_hex = _raw(key.public_key())
    record = {"algorithm": "ed25519", "signed": MANIFEST, "public_key": public_hex,
              "signature": key.sign((root / MANIFEST).read_bytes()).hex()}
    tmp = root / f".{SIGNATURE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, root / SIGNATURE)
    return fingerprint(public_hex)
