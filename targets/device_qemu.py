"""The emulated ARM64 device: an aarch64 Debian user space run with qemu-user.

Built once into the cache (`devices/qemu-arm64-<key>`), no emulation needed to
build it: mmdebstrap extracts Debian's arm64 packages (python3 and its
libraries), pip installs the aarch64 wheels of the TVM runtime and ONNX
Runtime into /opt/edgec-site, and a /proc/cpuinfo describing an ARMv8.2 core
is added, because ORT's CPU probe reads the host's x86 cpuinfo through
qemu-user and crashes on it (measured: segfault at `import onnxruntime`).
Programs run as `qemu-aarch64-static -L ROOTFS ROOTFS/usr/bin/python3 ...`.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

from edgec.cache import cached_dir
from edgec.errors import DeviceUnreachableError, MissingDependencyError

SUITE = "bookworm"
DEBIAN_PACKAGES = ("python3", "libstdc++6", "libgcc-s1", "coreutils")
DEVICE_WHEELS = ("apache-tvm==0.27.0.post1", "apache-tvm-ffi==0.1.14.post1", "numpy==2.4.6", "onnxruntime==1.32.0")
SITE = "/opt/edgec-site"
QEMU = "qemu-aarch64-static"
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
    spec = "|".join([SUITE, *DEBIAN_PACKAGES, *DEVICE_WHEELS, CPUINFO])
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
            "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311", "--only-binary=:all:",
            *DEVICE_WHEELS,
        ],
        check=True,
    )
    (root / "proc").mkdir(exist_ok=True)
    (root / "proc" / "cpuinfo").write_text(CPUINFO)
    (root / "opt" / "edgec" / "artifacts").mkdir(parents=True)


def ensure_rootfs() -> Path:
    """The cached aarch64 user space, built on first use (about 15 s and 450 MB)."""
    _require(QEMU, "qemu-user-static")
    return cached_dir("devices", rootfs_key(), _build_rootfs)


def run_python(root: Path, args: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    """Run the device's python3 under qemu-user; paths in `args` are device paths."""
    command = [
        _require(QEMU, "qemu-user-static"), "-L", str(root),
        "-E", f"PYTHONPATH={SITE}", "-E", f"EDGEC_QEMU_HOST_ROOT={root}",
        str(root / "usr/bin/python3"), *args,
    ]
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise DeviceUnreachableError(f"qemu-arm64: {' '.join(args[:2])} gave no answer within {timeout_s:.0f} s") from None
