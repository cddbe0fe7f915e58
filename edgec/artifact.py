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
from typing import TYPE_CHECKING, Any

import numpy as np

from edgec.errors import BadInputError, UnsupportedError

if TYPE_CHECKING:
    from edgec.targets.runtime import Runtime

MANIFEST = "manifest.json"
# 2: the manifest carries the family's program (how entries are driven) and its section.
FORMAT = "edgec-artifact/2"
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
        if path.is_file() and path != root / MANIFEST
    }


def check_output_dir(out: Path, force: bool, protected: tuple[Path, ...] = ()) -> None:
    """Refuse, before any work, every output path the compile could not finish or must not replace."""
    resolved = out.resolve()
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        raise BadInputError(f"-o {out} is the current directory or one above it; give a new directory path")
    for keep in protected:
        keep_resolved = keep.resolve()
        if resolved == keep_resolved or resolved in keep_resolved.parents:
            raise BadInputError(f"-o {out} would replace the input model {keep}; choose another path")
    if out.exists() and not out.is_dir():
        raise BadInputError(f"-o {out} is a file; give a directory path")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise BadInputError(f"-o {out} exists and is not empty; pass --force to replace it or choose another path")
        if not (out / MANIFEST).is_file():
            raise BadInputError(f"-o {out} is not an edgec artifact; --force only replaces artifacts, choose another path")
    parent = resolved.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = Path(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent))
        probe.rmdir()
    except OSError as exc:
        raise BadInputError(f"-o {out}: cannot write in {parent} ({exc.strerror}); choose another path") from None


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


def write_manifest(root: Path, manifest: dict[str, Any], files: dict[str, str] | None = None) -> dict[str, Any]:
    """`files`: hashes already computed for this tree (saves re-reading hundreds of MB)."""
    manifest = dict(manifest)
    manifest["format"] = FORMAT
    manifest["files"] = hash_tree(root) if files is None else files
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
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{path} is not valid JSON ({exc}); the artifact is damaged") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise BadInputError(f"{path}: format {found!r} is not {FORMAT!r}; recompile with this edgec")
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise BadInputError(f"{path} lacks {', '.join(missing)}; the artifact is damaged, recompile it")
    from edgec.families import check_section

    check_section(root, manifest)
    return manifest


REQUIRED_KEYS: tuple[str, ...] = (
    "model", "target", "backend", "backend_record", "files", "reference", "passes", "size_bytes", "program",
)


def artifact_file(root: Path, manifest: dict[str, Any], relative: str) -> Path:
    """A file the manifest refers to, only if it is inside the artifact and hashed in it:
    a edited manifest must not make edgec load a library from elsewhere."""
    if relative not in manifest["files"]:
        raise BadInputError(f"{root}: the manifest refers to {relative!r}, which is not one of its hashed files")
    path = (root / relative).resolve()
    if root.resolve() not in path.parents:
        raise BadInputError(f"{root}: the manifest refers to {relative!r} outside the artifact")
    return path


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


def tokenizer_dir(root: Path, manifest: dict[str, Any]) -> Path:
    """The tokenizer the artifact carries (always `tokenizer/` inside it)."""
    if manifest.get("tokenizer") != "tokenizer" or not any(f.startswith("tokenizer/") for f in manifest["files"]):
        raise BadInputError(f"{root}: this artifact carries no tokenizer; compile a model directory that has one")
    return root / "tokenizer"


def load_tokenizer(root: Path, manifest: dict[str, Any]) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir(root, manifest)))


def artifact_runs_here(manifest: dict[str, Any]) -> tuple[bool, str]:
    target = manifest["target"]
    if target["arch"] != platform.machine() or target.get("cross_compiler"):
        return False, f"built for {target['name']} ({target['arch']}); this machine is {platform.machine()}"
    return True, ""


def open_runtime(root: Path, manifest: dict[str, Any]) -> Runtime:
    runs, why = artifact_runs_here(manifest)
    if not runs:
        raise UnsupportedError(f"{root}: cannot run here: {why}; deploy it to a matching device")
    from edgec.targets.agent import missing_features

    missing = missing_features(manifest["target"])
    if missing:
        raise UnsupportedError(
            f"{root}: built for CPU features this machine lacks ({', '.join(missing)}); "
            "recompile with --target x86_64 (portable) or --target cpu on this machine"
        )
    backend = manifest["backend"]
    record = manifest["backend_record"]
    if backend not in ("tvm", "onnx"):
        raise UnsupportedError(f"{root}: unknown backend {backend!r} in the manifest")
    referenced = [info.get("library") or info.get("file") for info in record.get("entries", {}).values()]
    referenced += [record[key] for key in ("params_file", "weights_file") if key in record]
    for name in referenced:
        artifact_file(root, manifest, f"model/{name}")
    from edgec.targets.runtime import Runtime

    if backend == "tvm":
        from edgec.targets.backend_tvm import use_all_cores

        use_all_cores()
    return Runtime(root / "model", backend, record, ort_provider=record.get("ort_provider", "CPUExecutionProvider"))


def save_reference(root: Path, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(root / REFERENCE_FILE))


def load_reference(root: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(root / REFERENCE_FILE))
