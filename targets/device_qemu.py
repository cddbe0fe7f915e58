"""The emulated ARM64 device: an aarch64 Debian user space run with qemu-user.

Built once into the cache (`devices/qemu-arm64-<key>`), no emulation needed to
build it: mmdebstrap extracts Debian's arm64 packages (python3 and its
libraries), pip installs the aarch64 wheels of the TVM runtime and ONNX
Runtime into /opt/edgec-site, and a /proc/cpuinfo describing an ARMv8.2 core
is added, because ORT's CPU probe reads the host's x86 cpuinfo through
qemu-user and crashes on it (measured: segfault at `import onnxruntime`).
Programs run as `qemu-aarch64-static -cpu neoverse-n1 -L ROOTFS ROOTFS/usr/bin/python3 ...`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from functools import cached_property
from pathlib import Path

from edgec.cache import cache_root, cached_dir
from edgec.errors import MissingDependencyError

SUITE = "bookworm"
DEBIAN_PACKAGES = ("python3", "libstdc++6", "libgcc-s1", "coreutils")
# cloudpickle and psutil: the stock TVM RPC server (`edgec device up`) needs them;
# cryptography (with cffi, pycparser): the agent checks ed25519 signatures (`--trust`).
DEVICE_WHEELS = (
    "apache-tvm==0.27.0.post1", "apache-tvm-ffi==0.1.14.post1", "numpy==2.4.6", "onnxruntime==1.32.0",
    "cloudpickle==3.1.3", "psutil==7.2.2", "cryptography==50.0.2", "cffi==2.1.1", "pycparser==3.12",
)
SITE = "/opt/edgec-site"
QEMU = "qemu-aarch64-static"
# The emulated core is the one CPUINFO describes (Neoverse-N1: ARMv8.2 with dotprod and
# fp16, no SVE). qemu's default "max" core advertises SVE and SME, which ONNX Runtime's
# kernels then use and qemu emulates far more slowly (measured, Gemma 3 270M: a 15-token
# prefill took 38 s on this core and over 6 minutes on "max").
CPU = "neoverse-n1"
CPUINFO = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x3
CPU part\t: 0xd0c
CPU revision\t: 1

"""


def _require(tool: str, package: str) -> str:
    found = shutil.which(tool)
    if found is None:
        raise MissingDependencyError(f"the emulated arm64 device needs {tool}; `make demo` installs it (Debian {package})")
    return found


def rootfs_key() -> str:
    spec = "|".join([SUITE, *DEBIAN_PACKAGES, *DEVICE_WHEELS, CPUINFO, "fast-start"])
    return "qemu-arm64-" + hashlib.sha256(spec.encode()).hexdigest()[:12]


def _build_rootfs(root: Path) -> None:
    mmdebstrap = _require("mmdebstrap", "mmdebstrap")
    subprocess.run(
        [mmdebstrap, "--quiet", "--variant=extract", "--architectures=arm64", f"--include={','.join(DEBIAN_PACKAGES)}", SUITE, str(root)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "--quiet", "--no-warn-script-location",
            "--target", str(root / SITE.lstrip("/")),
            "--platform", "manylinux_2_28_aarch64", "--platform", "manylinux_2_17_aarch64",
            "--platform", "manylinux2014_aarch64", "--python-version", "3.11", "--implementation", "cp",
            "--abi", "cp311", "--abi", "abi3", "--only-binary=:all:",
            *DEVICE_WHEELS,
        ],
        check=True,
    )
    _fast_start(root)
    (root / "proc").mkdir(exist_ok=True)
    (root / "proc" / "cpuinfo").write_text(CPUINFO)
    (root / "opt" / "edgec" / "artifacts").mkdir(parents=True)


def _fast_start(root: Path) -> None:
    """What a device needs to start fast: no ml_dtypes (bfloat16 / float8 for numpy,
    optional for the runtime: 12 s of an emulated `import tvm` for dtypes no artifact
    uses), and the system Python's modules compiled once (the extract variant runs no
    py3compile, and an emulated interpreter would compile them again on every start).
    TVM's compiler library stays: artifacts call kernels registered there (the act
    pass's top-k is `tvm.contrib.sort.topk`), which a runtime-only TVM lacks."""
    site = root / SITE.lstrip("/")
    for path in site.glob("ml_dtypes*"):
        shutil.rmtree(path)
    stdlib = next((root / "usr" / "lib").glob("python3.*"))
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-s", str(root), "-p", "/", str(stdlib)],
                   check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def ensure_rootfs() -> Path:
    """The cached aarch64 user space, built on first use (about 15 s and 450 MB)."""
    _require(QEMU, "qemu-user-static")
    return cached_dir("devices", rootfs_key(), _build_rootfs)


DEVICE_ROOT = "opt/edgec"


class QemuDevice:
    """The emulated aarch64 user space as a deploy target: files are copied into its
    file system, and the agent runs under qemu-user (no binfmt_misc needed)."""

    name = "qemu-arm64"
    emulated = True

    @cached_property
    def rootfs(self) -> Path:
        """Built on first use (not when the URI is parsed), so bad input is refused first."""
        return ensure_rootfs()

    def machine(self) -> str:
        return "aarch64"

    @property
    def uploads(self) -> str:
        return f"/{DEVICE_ROOT}/artifacts"

    @property
    def local_uploads(self) -> Path:
        """Where the user space is (or will be) cached: cleaning never builds it."""
        return cache_root() / "devices" / rootfs_key() / DEVICE_ROOT / "artifacts"

    def upload(self, root: Path, name: str, timeout_s: float) -> str:
        """Copy into the device's file system via a temporary sibling; returns the device path.
        (A local copy: `timeout_s` is for devices behind a network.)"""
        parent = self.host_path(self.uploads)
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent))
        try:
            for item in root.iterdir():
                if item.is_dir():
                    shutil.copytree(item, tmp / item.name)
                else:
                    shutil.copy2(item, tmp / item.name)
            final = parent / name
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        self.install_agent()
        return f"{self.uploads}/{name}"

    def install_agent(self) -> None:
        from edgec.targets.devices import AGENT_FILES

        for source in AGENT_FILES:
            shutil.copy2(source, self.rootfs / DEVICE_ROOT / source.name)

    def host_path(self, device_path: str) -> Path:
        return self.rootfs / device_path.lstrip("/")

    def agent_command(self, args: list[str]) -> list[str]:
        return [
            _require(QEMU, "qemu-user-static"), "-cpu", CPU, "-L", str(self.rootfs),
            "-E", f"PYTHONPATH={SITE}", "-E", f"EDGEC_QEMU_HOST_ROOT={self.rootfs}",
            str(self.rootfs / "usr/bin/python3"), f"/{DEVICE_ROOT}/agent.py", *args,
        ]
