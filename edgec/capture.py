"""Third-party output held back: what TVM's C++ code, the cross compiler, ONNX Runtime and
library loggers write to the process's stderr, and Python warnings, are collected while a
command runs and reported once at the end (each distinct line with its count) instead of
interleaving with edgec's own messages.

edgec's messages still reach the terminal: while file descriptor 2 points at the
collection, `sys.stderr` (which rich's console and tqdm write through) points at a copy of
the real one.
"""

from __future__ import annotations

import io
import os
import re
import sys
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

# "[23:54:19] /project/include/tvm/...": TVM stamps each log line with the time.
_STAMP = re.compile(r"^\[\d\d:\d\d:\d\d\] ")


@dataclass
class Collected:
    """Lines collected so far, in first-seen order with their counts."""

    counts: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def lines(self) -> list[str]:
        return [f"{count}x {line}" if count > 1 else line for line, count in self.counts.items()]


def _writes_to_fd2(stream: object) -> bool:
    try:
        return stream.fileno() == 2  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return False  # a test runner's in-memory stream


@contextmanager
def third_party_output() -> Iterator[Collected]:
    """Collect third-party output for the block; the caller reports `Collected` afterwards."""
    collected = Collected()
    sys.stderr.flush()
    sink = tempfile.TemporaryFile()
    real_fd = os.dup(2)
    os.dup2(sink.fileno(), 2)
    swapped = sys.stderr
    if _writes_to_fd2(swapped):
        sys.stderr = io.TextIOWrapper(os.fdopen(os.dup(real_fd), "wb", buffering=0), encoding="utf-8",
                                      errors="replace", line_buffering=True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            yield collected
    finally:
        if sys.stderr is not swapped:
            sys.stderr.close()
            sys.stderr = swapped
        os.dup2(real_fd, 2)
        os.close(real_fd)
        sink.seek(0)
        for raw in sink.read().decode(errors="replace").splitlines():
            line = _STAMP.sub("", raw).rstrip()
            if line:
                collected.counts[line] += 1
        sink.close()
        for warning in caught:
            collected.counts[f"{warning.category.__name__}: {warning.message}"] += 1
