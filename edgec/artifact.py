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

from edgec.errors import BadInputError, CheckFailedError, UnsupportedError
from edgec.locks import exclusive
from edgec.targets.signature import SIGNATURE

if TYPE_CHECKING:
    from edgec.targets.runtime import Runtime

MANIFEST = "manifest.json"
# 2: the manifest carries the family's program (how entries are driven) and its section.
# 3: the manifest carries its own digest.
FORMAT = "edgec-artifact/3"
REFERENCE_FILE = "reference.safetensors"
# float16 artifacts are compared with the float32 model: half precision alone moves
# logits by ~1e-3 of their range, so their parity tolerance is at least this.
FLOAT16_MIN_RTOL = 1e-2
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


# Beside the files the manifest lists: the manifest, and a signature of it (`edgec sign`).
UNLISTED = (MANIFEST, SIGNATURE)


def hash_tree(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): sha256_file(path)
        for path in sorted(root.rglob("*"))
        if path.is_file() and str(path.relative_to(root)) not in UNLISTED
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
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise BadInputError(f"-o {out} is a file or a link; give a directory path")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise BadInputError(f"-o {out} exists and is not empty; pass --force to replace it or choose another path")
        foreign = foreign_files(out)
        if foreign is None:
            raise BadInputError(f"-o {out} is not an edgec artifact; --force only replaces artifacts, choose another path")
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise BadInputError(f"-o {out} holds files edgec did not write ({shown}); --force replaces only edgec's own "
                                "files: move them out or choose another path")
    parent = resolved.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = Path(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent))
        probe.rmdir()
    except OSError as exc:
        raise BadInputError(f"-o {out}: cannot write in {parent} ({exc.strerror}); choose another path") from None


def foreign_files(out: Path) -> list[str] | None:
    """Files under `out` that its manifest does not list (sorted); None if `out` holds no
    edgec manifest at all. What --force may replace is exactly an artifact with none."""
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not str(manifest.get("format", "")).startswith("edgec-artifact/"):
        return None
    listed = set(manifest.get("files") or {}) | set(UNLISTED)
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if not p.is_dir() and str(p.relative_to(out)) not in listed)


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """An exclusive hold on the output path (a lock file beside it) for a whole compile;
    a second edgec writing the same path is refused at once, naming the holder."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(out.parent / f".{out.name}.lock",
                   lambda holder: f"-o {out} is being written by another edgec ({holder}); wait for it to finish or choose another path"):
        yield


@contextmanager
def staging_dir(out: Path, force: bool) -> Iterator[Path]:
    """A temporary sibling of `out`, renamed to `out` when the block finishes without error.
    The caller checked `out` (under `output_lock`); it is checked again at the end: whatever
    appeared there meanwhile is replaced only if it is edgec's own artifact and --force was given."""
    with staged(out) as tmp:
        yield tmp
        check_output_dir(out, force)


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A temporary sibling of `out`, renamed to `out` (replacing what is there) when the
    block finishes without error, removed otherwise: a reader finds the old directory or
    the new one, never half of either."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _move_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _move_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, old / "replaced")
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def write_manifest(root: Path, manifest: dict[str, Any], files: dict[str, str] | None = None) -> dict[str, Any]:
    """`files`: hashes already computed for this tree (saves re-reading hundreds of MB)."""
    manifest = dict(manifest)
    manifest["format"] = FORMAT
    manifest["files"] = hash_tree(root) if files is None else files
    manifest["size_bytes"] = sum((root / name).stat().st_size for name in manifest["files"])
    manifest["digest"] = manifest_digest(manifest)
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON, without the digest itself: an edit to the
    target, the tolerance or a file hash after the compile no longer goes unnoticed."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return "sha256:" + hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ELF e_machine -> the architecture name targets use.
_ELF_MACHINES = {62: "x86_64", 183: "aarch64", 40: "arm", 243: "riscv64"}


def elf_machine(path: Path) -> str | None:
    """The architecture a shared library was built for (None if it is not ELF)."""
    with open(path, "rb") as handle:
        head = handle.read(20)
    if head[:4] != b"\x7fELF" or len(head) < 20:
        return None
    number = int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
    return _ELF_MACHINES.get(number, f"ELF machine {number}")


def self_check(root: Path, manifest: dict[str, Any]) -> list[str]:
    """What in the manifest contradicts itself or the files it names (each a sentence)."""
    problems = []
    if manifest.get("digest") != manifest_digest(manifest):
        problems.append(f"{MANIFEST} does not match its digest: it was edited after the compile")
    recipe = manifest.get("recipe", {})
    rtol = float(recipe.get("parity", {}).get("rtol", -1))
    if recipe.get("dtype") == "float16":
        rtol = max(rtol, FLOAT16_MIN_RTOL)
    recorded = manifest["reference"].get("tolerance", {}).get("rtol")
    if recorded != rtol:
        problems.append(f"the parity tolerance rtol={recorded} is not the one its recipe gives ({rtol})")
    # Artifacts from before the floor have neither (0.0: no floor).
    atol = float(recipe.get("parity", {}).get("atol", 0.0))
    recorded_atol = manifest["reference"].get("tolerance", {}).get("atol", 0.0)
    if recorded_atol != atol:
        problems.append(f"the parity tolerance atol={recorded_atol} is not the one its recipe gives ({atol})")
    arch = manifest["target"].get("arch")
    # A GPU target's library holds host code for the machine that built it: CPU targets only.
    for relative in manifest["files"] if arch in _ELF_MACHINES.values() else []:
        if relative.endswith(".so") and (root / relative).is_file():
            built = elf_machine(root / relative)
            if built is not None and built != arch:
                problems.append(f"{relative} is built for {built}, but the manifest's target {manifest['target'].get('name')} is {arch}")
    return problems


def read_manifest(root: Path, check_self: bool = True) -> dict[str, Any]:
    """The artifact's manifest, refused if it is damaged, from another format or (unless
    `check_self` is off, for verify to list every problem) contradicts itself."""
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
    problems = self_check(root, manifest) if check_self else []
    if problems:
        raise CheckFailedError(f"{root}: {problems[0]}; recompile it (edgec verify {root} lists every problem)")
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
    from edgec.model import load_tokenizer_files

    return load_tokenizer_files(tokenizer_dir(root, manifest))


def artifact_runs_here(manifest: dict[str, Any]) -> tuple[bool, str]:
    target = manifest["target"]
    if target["arch"] != platform.machine() or target.get("cross_compiler"):
        return False, f"built for {target['name']} ({target['arch']}); this machine is {platform.machine()}"
    return True, ""


def checked_files(root: Path, manifest: dict[str, Any]) -> None:
    """Refuse (exit 4) an artifact whose files differ from its manifest. Fast path: a file
    whose size and modification time are those recorded when it last hashed clean is not
    read again (`edgec verify` always hashes everything)."""
    from edgec.cache import cache_root

    record_path = cache_root() / "verified" / (hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:24] + ".json")

    def stats() -> dict[str, list[int]]:
        found = {}
        for path in sorted(root.rglob("*")):
            if path.is_file() and str(path.relative_to(root)) not in UNLISTED:
                info = path.stat()
                found[str(path.relative_to(root))] = [info.st_size, info.st_mtime_ns]
        return found

    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        record = {}
    now = stats()
    if record.get("digest") == manifest.get("digest") and record.get("files") == now:
        return
    hashes = check_hashes(root, manifest)
    if not hashes.ok:
        changed = hashes.mismatched + hashes.missing + hashes.unexpected
        raise CheckFailedError(f"{root} does not match its manifest ({', '.join(changed[:3])}); nothing was run (edgec verify {root})")
    record_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = record_path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"digest": manifest.get("digest"), "files": now}))
    os.replace(tmp, record_path)


def open_runtime(root: Path, manifest: dict[str, Any], check_files: bool = True, threads: int | None = None) -> Runtime:
    """A runtime for the artifact's entries, after its files were checked against the
    manifest (`check_files=False` only where they were just hashed); `threads`: the CPU
    threads its kernels use (default: every core)."""
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
    for part, target in manifest.get("part_targets", {}).items():
        lacking = missing_features(target)
        if lacking:
            raise UnsupportedError(f"{root}: its {part} parts are built for {target['name']} and this machine lacks "
                                   f"{', '.join(lacking)}; run it where that is, or recompile with --target {manifest['target']['name']}")
    backend = manifest["backend"]
    record = manifest["backend_record"]
    if backend not in ("tvm", "onnx"):
        raise UnsupportedError(f"{root}: unknown backend {backend!r} in the manifest")
    referenced = [info.get("library") or info.get("file") for info in record.get("entries", {}).values()]
    referenced += [record[key] for key in ("params_file", "weights_file") if key in record]
    for name in referenced:
        artifact_file(root, manifest, f"model/{name}")
    if check_files:
        checked_files(root, manifest)
    from edgec.targets.runtime import Runtime

    if backend == "tvm":
        from edgec.targets.backend_tvm import use_all_cores

        use_all_cores()
    return Runtime(root / "model", backend, record, ort_provider=record.get("ort_provider", "CPUExecutionProvider"), threads=threads)


def save_reference(root: Path, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.asarray(v, order="C") for k, v in tensors.items()}, str(root / REFERENCE_FILE))


def load_reference(root: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(root / REFERENCE_FILE))
