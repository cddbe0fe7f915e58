"""Nothing lost: a compile holds its output path from the first check to the rename, so a
second compile to the same path is refused at once and a file that appears there meanwhile
is kept; --force replaces only edgec's own files; SIGTERM and SIGHUP at any point of a
compile behave like Ctrl-C (a message, no staging directory, exit 128 + the signal)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.compile


def start_compile(model: Path, out: Path, *args: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "edgec.cli", "compile", str(model), "--backend", "onnx", "-o", str(out), *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_for(process: subprocess.Popen[str], marker: str) -> str:
    """The compile's progress (stderr) up to and including the line with `marker`."""
    assert process.stderr is not None
    seen = ""
    deadline = time.monotonic() + 300
    while marker not in seen and time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        seen += line
    assert marker in seen, f"the compile never printed {marker!r}:\n{seen}"
    return seen


def entries(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


@pytest.mark.parametrize(
    ("stop", "marker"),
    [
        (signal.SIGTERM, "load "),                  # before anything is staged
        (signal.SIGTERM, "onnx: export prefill"),   # the staging directory is half-written
        (signal.SIGTERM, "parity:"),                # every file staged, the check running
        (signal.SIGHUP, "export entries"),
        (signal.SIGHUP, "onnx: export decode"),
    ],
)
def test_a_stop_signal_at_any_point_leaves_nothing_and_exits_128_plus_the_signal(
    tiny_llama_dir: Path, tmp_path: Path, stop: signal.Signals, marker: str
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    process = start_compile(tiny_llama_dir, work / "out")
    seen = wait_for(process, marker)
    process.send_signal(stop)
    _, rest = process.communicate(timeout=120)
    assert process.returncode == 128 + int(stop), seen + rest
    assert f"interrupted ({stop.name})" in rest and "Traceback" not in rest, rest
    assert entries(work) == [], "a staging directory, lock file or partial artifact was left"


def test_a_second_compile_to_the_same_path_is_refused_naming_the_first(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = start_compile(tiny_llama_dir, out)
    wait_for(first, "load ")
    second = subprocess.run([sys.executable, "-m", "edgec.cli", "compile", str(tiny_llama_dir), "-o", str(out), "--force"],
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and f"is being written by another edgec (pid {first.pid}" in second.stderr, second.stderr
    assert "Traceback" not in second.stderr
    _, rest = first.communicate(timeout=300)
    assert first.returncode == 0, rest
    assert (out / "manifest.json").is_file() and entries(tmp_path) == ["out"]

    # --force replaces edgec's own artifact, never a file edgec did not write into it.
    (out / "notes.txt").write_text("mine")
    forced = subprocess.run([sys.executable, "-m", "edgec.cli", "compile", str(tiny_llama_dir), "-o", str(out), "--force"],
                            capture_output=True, text=True, timeout=120)
    assert forced.returncode == 2 and "holds files edgec did not write (notes.txt)" in forced.stderr, forced.stderr
    assert (out / "notes.txt").read_text() == "mine" and (out / "manifest.json").is_file()


def test_a_file_that_appears_in_the_output_during_the_compile_is_kept(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    process = start_compile(tiny_llama_dir, out)
    wait_for(process, "onnx: export prefill")
    out.mkdir()
    (out / "results.csv").write_text("a user's file")
    _, rest = process.communicate(timeout=300)
    assert process.returncode == 2 and f"-o {out} exists and is not empty" in rest, rest
    assert entries(out) == ["results.csv"] and (out / "results.csv").read_text() == "a user's file"
    assert entries(tmp_path) == ["out"], "the staging directory or the lock file was left"
