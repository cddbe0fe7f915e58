"""Third-party output (TVM's C++ log lines, compilers, library warnings) is held back and
summarised; edgec's own messages still reach the terminal; -q and -v."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgec.cli import app

runner = CliRunner()

# Runs in a fresh interpreter so that file descriptor 2 is a real one, as in a terminal.
_PROBE = r"""
import os, subprocess, sys, warnings
from edgec.capture import third_party_output
with third_party_output() as collected:
    subprocess.run(["sh", "-c", "echo '[12:00:00] /tvm/x.h:1: Warning: fast mode' >&2; echo '[12:00:01] /tvm/x.h:1: Warning: fast mode' >&2"])
    os.write(2, b"g++: note: from the compiler\n")
    warnings.warn("a library's warning", UserWarning)
    print("edgec's own progress", file=sys.stderr)
print(collected.lines(), file=sys.stdout)
"""


def test_fd2_output_and_warnings_are_collected_while_edgecs_own_messages_pass() -> None:
    probe = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    assert probe.stderr == "edgec's own progress\n"
    assert eval(probe.stdout) == [  # noqa: S307 - our own probe's printed list
        "2x /tvm/x.h:1: Warning: fast mode",
        "g++: note: from the compiler",
        "UserWarning: a library's warning",
    ]


def _gathers(path: Path, count: int) -> Path:
    """An ONNX graph of `count` table lookups: TVM warns about each Gather it lowers."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    tables = [numpy_helper.from_array(np.full((10, 4), i, dtype=np.float32), f"table{i}") for i in range(count)]
    nodes = [helper.make_node("Gather", [f"table{i}", "ids"], [f"y{i}"]) for i in range(count)]
    graph = helper.make_graph(nodes, "gathers", [helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [3, 4]) for i in range(count)], initializer=tables)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.compile
def test_a_tvm_compile_prints_no_third_party_lines_and_v_shows_each_once(tmp_path: Path) -> None:
    """TVM's C++ used to print the same "Fast mode segfaults" warning 13-14 times per compile."""
    model = _gathers(tmp_path / "gathers.onnx", 3)
    command = [sys.executable, "-m", "edgec.cli", "compile", str(model), "--backend", "tvm"]
    plain = subprocess.run([*command, "-o", str(tmp_path / "plain")], capture_output=True, text=True, timeout=600)
    assert plain.returncode == 0, plain.stderr
    assert "Warning" not in plain.stderr and "Fast mode" not in plain.stderr, plain.stderr
    hidden = [line for line in plain.stderr.splitlines() if "of third-party output hidden" in line]
    assert len(hidden) == 1 and "edgec -v" in hidden[0], plain.stderr
    total, distinct = int(hidden[0].split()[0]), int(hidden[0].split("(")[1].split()[0])
    verbose = subprocess.run([sys.executable, "-m", "edgec.cli", "-v", *command[3:], "-o", str(tmp_path / "verbose")],
                             capture_output=True, text=True, timeout=600)
    assert verbose.returncode == 0, verbose.stderr
    lines = verbose.stderr.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("third-party output ("))
    assert lines[header] == f"third-party output ({total} lines, {distinct} distinct):", verbose.stderr
    listed = [line.strip() for line in lines[header + 1:header + 1 + distinct]]
    counts = [int(line.split("x ", 1)[0]) if line.split("x ", 1)[0].isdigit() else 1 for line in listed]
    assert sum(counts) == total
    fast_mode = [line for line in listed if "Fast mode segfaults" in line]
    assert len(fast_mode) == 1 and fast_mode[0].startswith(f"{total}x " if distinct == 1 else ""), verbose.stderr


def test_quiet_and_verbose_together_are_refused() -> None:
    result = runner.invoke(app, ["-q", "-v", "targets", "list"])
    assert result.exit_code == 2 and "-q and -v contradict each other" in result.output


@pytest.mark.compile
def test_quiet_compile_prints_the_result_and_nothing_on_stderr(tmp_path: Path) -> None:
    model = _gathers(tmp_path / "gathers.onnx", 1)
    result = runner.invoke(app, ["-q", "compile", str(model), "--backend", "tvm", "-o", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert result.stderr == "" and result.stdout.startswith("artifact  ") and "\ntime      " in result.stdout
