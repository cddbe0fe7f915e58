"""Counted work reports its stage, percentage and elapsed time: a live bar on a terminal,
a line per tenth in a log, nothing with -q."""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from edgec.cli import app
from edgec.progress import advance

runner = CliRunner()
EVAL = ["eval", "zoo:tiny-lm", "--tokens", "2048", "--window", "64"]  # 33 windows


def test_a_plain_reporter_gets_a_line_per_tenth_and_the_last_step() -> None:
    lines: list[str] = []
    for done in range(1, 38):
        advance(lines.append, "work", done, 37, f"item {done}")
    percents = [int(re.search(r"\((\d+)%\)", line).group(1)) for line in lines]
    assert lines[-1] == "work: 37/37 (100%), item 37"
    assert percents == sorted(set(percents)) and len(lines) == 11  # 0% .. 90% tenths, then the end
    again: list[str] = []
    advance(again.append, "work", 1, 3)
    assert again == ["work: 1/3 (33%)"]


def test_a_log_gets_percentages_of_the_windows_and_quiet_gets_none() -> None:
    result = runner.invoke(app, EVAL)
    assert result.exit_code == 0, result.output
    counted = re.findall(r"ppl windows: (\d+)/33 \((\d+)%\)", result.stderr)
    assert counted and counted[-1] == ("33", "100") and len(counted) == 11, result.stderr  # 0%..90% tenths, then the end
    percents = [int(p) for _, p in counted]
    assert percents == sorted(set(percents))
    quiet = runner.invoke(app, ["-q", *EVAL])
    assert quiet.exit_code == 0 and "ppl windows" not in quiet.stderr and "perplexity" in quiet.stdout


def test_a_terminal_gets_a_bar_and_a_closing_line_with_the_time() -> None:
    leader, follower = os.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120"}
    process = subprocess.Popen([sys.executable, "-m", "edgec.cli", *EVAL], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=follower, env=env, cwd=Path(__file__).resolve().parents[1])
    os.close(follower)
    seen = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 300)
        if not ready:
            process.kill()
            break
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed: the program has exited
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    assert process.wait(timeout=60) == 0
    text = seen.decode(errors="replace")
    assert "━" in text and re.search(r"\d+%", text), text  # rich's bar and its percentage
    assert re.search(r"ppl windows: 33/33 \(100%\) in \d+\.\d s", text), text
    assert process.stdout is not None and "perplexity" in process.stdout.read().decode()
