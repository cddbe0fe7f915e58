"""Artifacts: self-describing directories, written atomically, verifiable later.

Layout:
    manifest.json          what, from what, how, with which tools; sha256 of every file
    model/                 the backend's files (TVM: <entry>.so + params; ONNX: <entry>.onnx + weights.bin)
    tokenizer/             tokenizer files for causal LMs
    reference.safetensors  reference inputs and the torch outputs for them

A compile writes into a hidden temporary sibling of the output and renames it
into place only when everything, the parity check included, is done; an error
or Ctrl-C removes the temporary directory, so nothing half-written remains.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from edgec.errors import BadInputError, UnsupportedError

MANIFEST = "manifest.json"
FORMAT = "edgec-artifact/1"
REFERENCE_FILE = "reference.safetensors"
TOOL_PACKAGES: tuple[str, ...] = (
    "edgec",
    "torch",
    "apache-tvm",
    "apache-tvm-ffi",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "transformers",
    "optimum",
    "optimum-onnx",
    "diffusers",
    "numpy",
    "safetensors",
    "tokenizers",
    "typer",
)


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in TOOL_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hash_tree(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): sha256_file(path)
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


def check_output_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise BadInputError(f"-o {out} is a file; give a directory path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise BadInputError(f"-o {out} exists and is not empty; pass --force to replace it or choose another path")


@contextmanager
def staging_dir(out: Path, force: bool) -> Iterator[Path]:
    """A temporary sibling of `out`, renamed to `out` when the block finishes without error."""
    check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "replaced")
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_manifest(root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    manifest = dict(manifest)
    manifest["format"] = FORMAT
    manifest["files"] = hash_tree(root)
    manifest["size_bytes"] = sum((root / name).stat().st_size for name in manifest["files"])
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


def read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not root.is_dir():
        raise BadInputError(f"{root} is not an artifact directory (edgec compile -o DIR makes one)")
    if not path.is_file():
        raise BadInputError(f"{root} has no {MANIFEST}; it is not an edgec artifact")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BadInputError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); the artifact is damaged") from None
    if manifest.get("format") != FORMAT:
        raise BadInputError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}; recompile with this edgec")
    return manifest


@dataclass
class HashCheck:
    ok: bool
    mismatched: list[str]
    missing: list[str]
    unexpected: list[str]


def check_hashes(root: Path, manifest: dict[str, Any]) -> HashCheck:
    expected: dict[str, str] = manifest["files"]
    actual = hash_tree(root)
    mismatched = sorted(name for name in expected if name in actual and actual[name] != expected[name])
    missing = sorted(name for name in expected if name not in actual)
    unexpected = sorted(name for name in actual if name not in expected)
    return HashCheck(not (mismatched or missing or unexpected), mismatched, missing, unexpected)


class Runtime:
    """The common face of backend runtimes: named entries, numpy in, numpy out."""

    entries: list[str]

    def run(self, entry: str, inputs: list[np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError


def artifact_runs_here(manifest: dict[str, Any]) -> tuple[bool, str]:
    target = manifest["target"]
    if target["arch"] != platform.machine() or target.get("cross_compiler"):
        return False, f"built for {target['name']} ({target['arch']}); this machine is {platform.machine()}"
    return True, ""


def open_runtime(root: Path, manifest: dict[str, Any]) -> Any:
    runs, why = artifact_runs_here(manifest)
    if not runs:
        raise UnsupportedError(f"{root}: cannot run here: {why}; deploy it to a matching device")
    backend = manifest["backend"]
    if backend == "tvm":
        from edgec.targets.backend_tvm import TVMRuntime

        return TVMRuntime(root / "model", manifest["backend_record"])
    if backend == "onnx":
        from edgec.targets.backend_onnx import ORTRuntime

        return ORTRuntime(root / "model", manifest["backend_record"])
    raise UnsupportedError(f"{root}: unknown backend {backend!r} in the manifest")


def save_reference(root: Path, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(root / REFERENCE_FILE))


def load_reference(root: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(root / REFERENCE_FILE))
