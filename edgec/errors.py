"""User-facing errors and the exit codes the CLI documents.

Every failure a user can cause or fix is an EdgecError with a one-line message
naming the input and the fix; the CLI prints it without a traceback and exits
with the class's code. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_UNSUPPORTED = 3
EXIT_CHECK_FAILED = 4
EXIT_MISSING_DEPENDENCY = 5
EXIT_DEVICE_UNREACHABLE = 6
EXIT_INTERRUPTED = 130  # 128 + the signal: Ctrl-C (SIGINT) 130, SIGTERM 143, SIGHUP 129

EXIT_CODES: dict[int, str] = {
    EXIT_OK: "ok",
    EXIT_USAGE: "usage error or bad input (path, recipe, option)",
    EXIT_UNSUPPORTED: "unsupported model, op or target",
    EXIT_CHECK_FAILED: "parity or accuracy check failed (also: verify found a mismatch)",
    EXIT_MISSING_DEPENDENCY: "missing optional dependency",
    EXIT_DEVICE_UNREACHABLE: "device unreachable",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C; SIGTERM gives 143, SIGHUP 129); nothing was written",
}
# How CI, docker and systemd stop a process, and a closed terminal: handled as Ctrl-C is.
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

_interrupted = threading.Event()
_by_signal: list[signal.Signals] = []


def note_interrupts() -> None:
    """Turn SIGINT, SIGTERM and SIGHUP into KeyboardInterrupt, so every `finally` runs
    (staging directories removed, child process groups ended), and remember the signal
    even where a native library turns the KeyboardInterrupt into an error of its own
    (TVM's FFI re-raises it as RuntimeError inside schedule primitives), so the CLI still
    exits as interrupted and fallbacks that catch TVM errors do not swallow it. Main
    thread only (where Python runs signal handlers)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        _interrupted.set()
        _by_signal.append(signal.Signals(signum))
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        for stop in STOP_SIGNALS:
            signal.signal(stop, handler)


def note_signal(signum: int) -> None:
    """A stop signal that another handler caught first (torchrun's agent): exit as interrupted by it."""
    _interrupted.set()
    _by_signal.append(signal.Signals(signum))


def was_interrupted() -> bool:
    return _interrupted.is_set()


def interrupt_exit() -> tuple[str, int]:
    """The signal's name and the conventional exit code (128 + its number)."""
    stop = _by_signal[0] if _by_signal else signal.SIGINT
    return stop.name, 128 + int(stop)


class EdgecError(Exception):
    """An error the user can act on; `exit_code` is what the CLI returns."""

    exit_code: int = EXIT_USAGE

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadInputError(EdgecError):
    exit_code = EXIT_USAGE


class UnsupportedError(EdgecError):
    exit_code = EXIT_UNSUPPORTED


class CheckFailedError(EdgecError):
    exit_code = EXIT_CHECK_FAILED


class MissingDependencyError(EdgecError):
    exit_code = EXIT_MISSING_DEPENDENCY


# Modules edgec imports where they are needed: their package, and what needs them.
DEPENDENCIES = {
    "onnxruntime": ("onnxruntime", "the ONNX backend and ONNX parity"),
    "onnx": ("onnx", "the ONNX backend"),
    "onnxscript": ("onnxscript", "the ONNX exporter and .onnx clean-up"),
    "onnx_ir": ("onnx-ir", ".onnx clean-up"),
    "tvm": ("apache-tvm", "the TVM backend"),
    "transformers": ("transformers", "Hugging Face models"),
    "safetensors": ("safetensors", "reading weights"),
    "matplotlib": ("matplotlib", "--plot"),
}


def missing_dependency(module: str) -> MissingDependencyError | None:
    """The error for one of edgec's dependencies that is not installed, naming its pinned
    version; None for any other module (whose absence is a bug)."""
    from pathlib import Path

    top = module.split(".")[0]
    if top not in DEPENDENCIES:
        return None
    package, needed_by = DEPENDENCIES[top]
    pinned = package
    lock = Path(__file__).resolve().parent.parent / "requirements.lock"
    if lock.is_file():
        pinned = next((line.strip() for line in lock.read_text().splitlines() if line.lower().startswith(f"{package}==")), package)
    return MissingDependencyError(f"{package} is not installed (needed by {needed_by}): `make demo` installs the pinned set, "
                                  f"or pip install '{pinned}'")


def require_modules(*modules: str) -> None:
    """Refuse (exit 5) before any work when a dependency the job will import is missing."""
    import importlib.util

    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ValueError, ImportError):  # ValueError: blocked in sys.modules
            found = False
        missing = missing_dependency(module)
        if not found and missing is not None:
            raise missing


class DeviceUnreachableError(EdgecError):
    exit_code = EXIT_DEVICE_UNREACHABLE
