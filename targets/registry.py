"""Targets as data: an alias resolves to a TVM target, a host, a cross compiler,
an ONNX Runtime execution provider and a capability table.

Resolution is a ladder (alias -> raw TVM target JSON) that says what it found,
and every unsupported combination is refused by name before any work.
"""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from edgec.errors import BadInputError, MissingDependencyError, UnsupportedError


@dataclass(frozen=True)
class Capability:
    """What one backend lowers on one target. Passes and recipes are checked against it
    before any work: a request outside the table is refused by name."""

    compute_dtypes: tuple[str, ...]  # the dtype the graph computes in (recipe `dtype`)
    weight_bits: tuple[int, ...]  # stored weight widths kept as such in the artifact
    sparsity: tuple[str, ...]  # weight sparsity patterns the backend exploits
    ops: tuple[str, ...]  # op families lowered (the Llama entries need all of them)
    # Reads a position-major KV cache where it lies, so decode returns only the new positions
    # and the runner appends them in place (edgec.lm); else decode returns the concatenated cache.
    appended_cache: bool = False
    # Runs a decode step's attention over that cache as one kernel (edgec::decode_attention).
    attention_kernel: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "compute_dtypes": list(self.compute_dtypes),
            "weight_bits": list(self.weight_bits),
            "sparsity": list(self.sparsity),
            "ops": list(self.ops),
            "appended_cache": self.appended_cache,
            "attention_kernel": self.attention_kernel,
        }


LM_OPS = ("linear", "embedding", "rms_norm", "rope", "softmax_attention_dynamic_length", "silu_mlp", "int8_dequant_matmul")
# Pruned weights are stored dense (a pruned weight is its zero code) unless noted: sparsity
# is never refused, it only saves bytes and time where a form below exploits it.
DENSE_ONLY = ("dense (zeros stored)",)
# TVM CPU: N:M (2:4) low-bit weights stored compressed (kept codes + positions), run by a
# sparse kernel where the schedule pass measured it faster than decode + dense matmul.
NM_COMPRESSED = ("dense (zeros stored)", "N:M compressed (2:4, 1:4, 1:2, 8:16), packed weights")
# Packed low-bit weights (edgec.packing): TVM decodes them inside its matmul kernels;
# ONNX Runtime runs 2/4/8 bits as MatMulNBits and decodes 3 bits in the graph.
# TVM on CPU reads the cache in place (one attention kernel per layer: targets/tvm_attention;
# the matmuls' views where attention is not plain: targets/tvm_views); ONNX Runtime would
# transpose each layer's cache on every step (SmolLM2 at 1,024 tokens: 16.6 tok/s, against
# 34.9 concatenated). On GPUs the views rewrite does not run yet: concatenated there.
CPU_CAPABILITIES = {
    "tvm": Capability(("float32",), (32, 8, 4, 3, 2), NM_COMPRESSED, (*LM_OPS, "packed_lowbit_matmul"), appended_cache=True,
                      attention_kernel=True),
    "onnx": Capability(("float32",), (32, 8, 4, 3, 2), DENSE_ONLY, (*LM_OPS, "packed_lowbit_matmul")),
}
GPU_CAPABILITIES = {
    "tvm": Capability(("float32", "float16"), (32, 16, 8), DENSE_ONLY, LM_OPS),
    "onnx": Capability(("float32", "float16"), (32, 16, 8), DENSE_ONLY, LM_OPS),
}

# LLVM feature name -> the name Linux shows in /proc/cpuinfo. Only these are recorded
# in an artifact and checked where it loads: they change the code LLVM may emit for
# tensor kernels. Crypto and CRC are left out: kernels never use them, and the
# Raspberry Pi 4's SoC lacks the crypto extension that LLVM's cortex-a72 assumes.
ISA_FLAGS = {
    "x86_64": {
        "sse4.1": "sse4_1", "sse4.2": "sse4_2", "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c",
        "bmi": "bmi1", "bmi2": "bmi2", "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512dq": "avx512dq",
        "avx512vl": "avx512vl", "avx512cd": "avx512cd", "avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16",
        "avx512vbmi": "avx512vbmi", "avx512ifma": "avx512ifma", "amx-tile": "amx_tile", "amx-int8": "amx_int8",
        "amx-bf16": "amx_bf16",
    },
    "aarch64": {
        "fp-armv8": "fp", "neon": "asimd", "dotprod": "asimddp", "fullfp16": "asimdhp", "i8mm": "i8mm",
        "bf16": "bf16", "sve": "sve", "sve2": "sve2", "lse": "atomics", "rdm": "asimdrdm", "rcpc": "lrcpc",
    },
}


@dataclass(frozen=True)
class TargetSpec:
    name: str
    aliases: tuple[str, ...]
    description: str
    arch: str  # machine the artifact runs on, as `uname -m` says it
    tvm_target: dict[str, Any]  # "mcpu": "<host>" is replaced by the detected host CPU
    cross_compiler: str | None  # None: the host's own compiler
    ort_provider: str
    backends: tuple[str, ...]
    capabilities: dict[str, Capability] = field(default_factory=lambda: dict(CPU_CAPABILITIES))
    notes: str = ""


HOST = "<host>"
ANDROID_COMPILER = "<android-ndk>"
ANDROID_NDK_CLANG = "toolchains/llvm/prebuilt/linux-x86_64/bin/aarch64-linux-android24-clang++"

TARGETS: tuple[TargetSpec, ...] = (
    TargetSpec(
        name="cpu",
        aliases=("host", "native"),
        description="this machine's CPU, with its detected mcpu (never LLVM's 'native')",
        arch=platform.machine(),
        tvm_target={"kind": "llvm", "mcpu": HOST},
        cross_compiler=None,
        ort_provider="CPUExecutionProvider",
        backends=("tvm", "onnx"),
    ),
    TargetSpec(
        name="x86_64",
        aliases=("x86-64", "amd64"),
        description="portable x86-64-v3 (AVX2, FMA) for artifacts that must run on other x86 machines",
        arch="x86_64",
        tvm_target={"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v3"},
        cross_compiler=None,
        ort_provider="CPUExecutionProvider",
        backends=("tvm", "onnx"),
    ),
    TargetSpec(
        name="arm64",
        aliases=("aarch64", "armv8"),
        description="generic 64-bit ARM with NEON (Linux, glibc)",
        arch="aarch64",
        tvm_target={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]},
        cross_compiler="aarch64-linux-gnu-g++",
        ort_provider="CPUExecutionProvider",
        backends=("tvm", "onnx"),
        notes="cross-compiled here; parity is checked on the device at deploy",
    ),
    TargetSpec(
        name="rpi4",
        aliases=("raspberry-pi-4", "cortex-a72"),
        description="Raspberry Pi 4 (Cortex-A72, NEON), 64-bit OS",
        arch="aarch64",
        tvm_target={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"]},
        cross_compiler="aarch64-linux-gnu-g++",
        ort_provider="CPUExecutionProvider",
        backends=("tvm", "onnx"),
        notes="cross-compiled here; runs on the emulated device too (qemu emulates the A72's ISA)",
    ),
    TargetSpec(
        name="rpi5",
        aliases=("raspberry-pi-5", "cortex-a76"),
        description="Raspberry Pi 5 (Cortex-A76: NEON, dot product, fp16), 64-bit OS",
        arch="aarch64",
        tvm_target={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76", "mattr": ["+neon", "+dotprod", "+fullfp16"]},
        cross_compiler="aarch64-linux-gnu-g++",
        ort_provider="CPUExecutionProvider",
        backends=("tvm", "onnx"),
        notes="cross-compiled here",
    ),
    TargetSpec(
        name="android-arm64",
        aliases=("android",),
        description="Android on 64-bit ARM (API 24+), built with the NDK's clang",
        arch="aarch64",
        tvm_target={"kind": "llvm", "mtriple": "aarch64-linux-android", "mattr": ["+neon"]},
        cross_compiler=ANDROID_COMPILER,
        ort_provider="CPUExecutionProvider",
        backends=("tvm", "onnx"),
        notes="needs ANDROID_NDK_HOME (the NDK is not a Debian package)",
    ),
    TargetSpec(
        name="cuda",
        aliases=("gpu", "cuda-sm80", "sm_80"),
        description="NVIDIA GPU, compute capability 8.0 (A100); host code for this CPU",
        arch="cuda",
        tvm_target={"kind": "cuda", "arch": "sm_80", "host": {"kind": "llvm", "mcpu": HOST}},
        cross_compiler=None,
        ort_provider="CUDAExecutionProvider",
        backends=("tvm", "onnx"),
        capabilities=GPU_CAPABILITIES,
        notes="compiled here (TVM's CUDA codegen); running needs a GPU and libcuda",
    ),
    TargetSpec(
        name="cuda-sm90",
        aliases=("sm_90", "h100"),
        description="NVIDIA GPU, compute capability 9.0 (H100); host code for this CPU",
        arch="cuda",
        tvm_target={"kind": "cuda", "arch": "sm_90", "host": {"kind": "llvm", "mcpu": HOST}},
        cross_compiler=None,
        ort_provider="CUDAExecutionProvider",
        backends=("tvm", "onnx"),
        capabilities=GPU_CAPABILITIES,
        notes="compiled here (TVM's CUDA codegen); running needs a GPU and libcuda",
    ),
)


@dataclass(frozen=True)
class ResolvedTarget:
    spec: TargetSpec
    tvm_target: dict[str, Any]
    how: str  # one line saying what the request resolved to
    backend: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def runs_here(self) -> bool:
        return self.spec.arch == platform.machine() and self.spec.cross_compiler is None

    @property
    def capability(self) -> Capability:
        return self.spec.capabilities[self.backend]

    def isa_features(self) -> list[str]:
        """The instruction-set features this target's code may use, as /proc/cpuinfo names
        them; for CUDA the compute capability ("sm_80"). An artifact records them and
        refuses to load where one is missing, instead of dying on an illegal instruction."""
        if self.tvm_target.get("kind") == "cuda":
            return [str(self.tvm_target.get("arch", "sm_80"))]
        if self.backend != "tvm":
            return []  # ONNX Runtime picks its kernels at run time from what the CPU has
        import tvm
        from tvm.target import codegen

        flags = ISA_FLAGS.get(self.spec.arch, {})
        enabled = {str(f) for f in codegen.llvm_get_cpu_features(tvm.target.Target(self.tvm_target))}
        return sorted(flags[name] for name in enabled if name in flags)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "arch": self.spec.arch,
            "tvm_target": self.tvm_target,
            "cross_compiler": self.spec.cross_compiler,
            "ort_provider": self.spec.ort_provider,
            "options": self.options,
            "isa_features": self.isa_features(),
            "capability": self.capability.to_json(),
        }


@lru_cache(maxsize=1)
def host_mcpu() -> str:
    import tvm

    detected = tvm.target.Target.from_device(tvm.cpu())
    return str(detected.attrs.get("mcpu", "generic"))


def _with_android_ndk(spec: TargetSpec, backend: str) -> TargetSpec:
    """The NDK lives wherever the user unpacked it: ANDROID_NDK_HOME names it."""
    import dataclasses
    import os

    ndk = os.environ.get("ANDROID_NDK_HOME")
    if backend != "tvm":
        return dataclasses.replace(spec, cross_compiler=None)
    if not ndk:
        raise MissingDependencyError(
            "target android-arm64 needs the Android NDK: set ANDROID_NDK_HOME to its directory "
            "(unpack the NDK first; it is not a Debian package)"
        )
    return dataclasses.replace(spec, cross_compiler=str(Path(ndk) / ANDROID_NDK_CLANG))


@lru_cache(maxsize=1)
def host_disabled_features() -> tuple[str, ...]:
    """LLVM features the detected host CPU model implies but the kernel does not expose
    (a VM that hides AMX from an Emerald Rapids guest): turned off with "-feature", so
    "this machine's CPU" builds code this machine runs."""
    import platform

    import tvm
    from tvm.target import codegen

    from edgec.targets.agent import cpu_flags

    flags = ISA_FLAGS.get(platform.machine(), {})
    have = cpu_flags()
    if not have:
        return ()
    implied = {str(f) for f in codegen.llvm_get_cpu_features(tvm.target.Target({"kind": "llvm", "mcpu": host_mcpu()}))}
    return tuple(sorted(f"-{name}" for name in implied if name in flags and flags[name] not in have))


def _fill_host(target: dict[str, Any]) -> dict[str, Any]:
    """Replace the "<host>" mcpu placeholder (also inside a nested "host" target)."""
    filled = {k: (host_mcpu() if v == HOST else _fill_host(v) if isinstance(v, dict) else v) for k, v in target.items()}
    if target.get("mcpu") == HOST and host_disabled_features():
        filled["mattr"] = [*filled.get("mattr", []), *host_disabled_features()]
    return filled


def _by_name(name: str) -> TargetSpec | None:
    for spec in TARGETS:
        if name == spec.name or name in spec.aliases:
            return spec
    return None


def known_names() -> list[str]:
    return [spec.name for spec in TARGETS]


def closest_name(request: str) -> str | None:
    import difflib

    names = [name for spec in TARGETS for name in (spec.name, *spec.aliases)]
    found = difflib.get_close_matches(request.lower(), names, n=1, cutoff=0.5)
    return found[0] if found else None


def _check_user_fields(tvm_target: dict[str, Any], what: str) -> None:
    """Fields a user set are checked before any work: TVM refuses unknown ones, and LLVM is
    asked whether it knows the mcpu for the triple (TVM itself accepts any name and
    silently builds for a generic CPU)."""
    import tvm
    from tvm.target import codegen

    try:
        tvm.target.Target(tvm_target)
    except (ValueError, RuntimeError) as exc:  # TVM raises these for a bad target
        raise BadInputError(f"{what}: TVM rejects it ({str(exc).splitlines()[0].split(' Target creation')[0]})") from None
    for part in (tvm_target, tvm_target.get("host")):
        if not isinstance(part, dict) or part.get("kind") != "llvm" or "mcpu" not in part:
            continue
        triple = str(part.get("mtriple") or codegen.llvm_get_system_triple())
        mcpu = str(part["mcpu"])
        if not codegen.llvm_is_valid_cpu(mcpu, triple):
            import difflib

            known = [str(c) for c in codegen.llvm_get_cpu_archlist(tvm.target.Target({"kind": "llvm", "mtriple": triple}))]
            near = difflib.get_close_matches(mcpu, known, n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(near)}? " if near else ""
            raise BadInputError(f"{what}: LLVM knows no CPU {mcpu!r} for {triple}; {hint}({len(known)} known, e.g. {', '.join(known[:4])})")


def resolve_target(request: str, backend: str, options: dict[str, Any] | None = None) -> ResolvedTarget:
    """alias -> spec, or a raw TVM target as JSON ('{"kind": "llvm", ...}')."""
    options = dict(options or {})
    text = request.strip()
    if text.startswith("{"):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BadInputError(f"--target {request!r}: not valid JSON ({exc.msg})") from None
        if not isinstance(raw, dict) or "kind" not in raw:
            raise BadInputError(f"--target {request!r}: a raw TVM target is a JSON object with a 'kind'")
        import tvm

        try:
            tvm.target.Target(raw)
        except (ValueError, RuntimeError) as exc:  # TVM raises these for a bad target
            raise BadInputError(f"--target {request!r}: TVM rejects it ({str(exc).splitlines()[0]})") from None
        if raw["kind"] != "llvm":
            raise UnsupportedError(f"--target {request!r}: edgec lowers raw targets of kind 'llvm' only for now")
        triple = str(raw.get("mtriple", ""))
        arch = triple.split("-")[0] if triple else platform.machine()
        cross = None if arch == platform.machine() else ("aarch64-linux-gnu-g++" if arch == "aarch64" else None)
        if arch != platform.machine() and cross is None:
            raise UnsupportedError(f"--target {request!r}: no cross compiler known for {arch}; use x86_64 or aarch64")
        spec = TargetSpec("raw", (), "raw TVM target", arch, raw, cross, TARGETS[0].ort_provider, ("tvm",))
        how = "raw TVM target"
    else:
        found = _by_name(text.lower())
        if found is None:
            near = closest_name(text)
            hint = f"did you mean '{near}'? " if near else ""
            raise BadInputError(f"unknown target '{request}'; {hint}known: {', '.join(known_names())} (edgec targets list)")
        spec = found
        how = f"alias {text}" if text != spec.name else spec.name
    if backend not in spec.backends:
        raise UnsupportedError(
            f"target {spec.name} has no {backend} backend; use --backend {' or '.join(spec.backends)}"
        )
    if spec.cross_compiler == ANDROID_COMPILER:
        spec = _with_android_ndk(spec, backend)
    if spec.cross_compiler is not None and backend == "tvm" and shutil.which(spec.cross_compiler) is None:
        raise MissingDependencyError(
            f"target {spec.name} needs the cross compiler {spec.cross_compiler}; `make demo` installs it "
            "(Debian g++-aarch64-linux-gnu)"
        )
    tvm_target = _fill_host(spec.tvm_target)
    for key, value in options.items():
        tvm_target[key] = [v for v in value.split(",") if v] if key == "mattr" and isinstance(value, str) else value
    if options or spec.name == "raw":
        _check_user_fields(tvm_target, f"--target-opt {' '.join(f'{k}={v}' for k, v in options.items())}" if options else f"--target {request!r}")
    described = ", ".join(f"{k}={v}" for k, v in tvm_target.items())
    return ResolvedTarget(spec, tvm_target, f"target {how} -> {described}; runs on {spec.arch}; backend {backend}", backend, options)


def is_part_targets(request: str) -> bool:
    """`--target sparse=cpu,dense=cuda`: a target per part of the model (a GCN's layers)."""
    return "=" in request and not request.strip().startswith("{")


def part_target_names(request: str) -> dict[str, str]:
    """{part: target name} of `PART=TARGET,PART=TARGET`, as given."""
    names: dict[str, str] = {}
    for item in request.split(","):
        part, sep, name = (text.strip() for text in item.partition("="))
        if not sep or not part or not name:
            raise BadInputError(f"--target {request!r}: give PART=TARGET pairs separated by commas, e.g. sparse=cpu,dense=cuda")
        if part in names:
            raise BadInputError(f"--target {request!r}: part {part} is given twice")
        names[part] = name
    return names


def resolve_part_targets(request: str, backend: str, options: dict[str, Any] | None = None) -> tuple[ResolvedTarget, dict[str, ResolvedTarget]]:
    """(the machine's CPU target, {part: target}) for `PART=TARGET,PART=TARGET`. The parts
    share one machine: one CPU target (which runs the artifact's host side) and, beside it,
    CUDA targets for that machine's GPU, whose host code is built for this machine."""
    parts = {part: resolve_target(name, backend, options) for part, name in part_target_names(request).items()}
    if backend != "tvm":
        raise UnsupportedError(f"--target {request!r}: a target per part is built with --backend tvm (ONNX Runtime runs "
                               "a whole artifact with one execution provider)")
    hosts = {t.name for t in parts.values() if t.spec.arch != "cuda"}
    if len(hosts) != 1:
        raise UnsupportedError(f"--target {request!r}: the parts run on one machine, so give one CPU target "
                               f"({'none' if not hosts else ', '.join(sorted(hosts))} given) beside any CUDA targets; "
                               f"for one target for every part give --target NAME")
    host = next(t for t in parts.values() if t.spec.arch != "cuda")
    if any(t.spec.arch == "cuda" for t in parts.values()) and host.spec.arch != platform.machine():
        raise UnsupportedError(f"--target {request!r}: CUDA targets carry host code for this machine ({platform.machine()}); "
                               f"the CPU part cannot be {host.name} ({host.spec.arch})")
    return host, parts
