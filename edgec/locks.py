"""Exclusive holds on a path, so that two edgec processes never write the same thing at once."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from edgec.errors import BadInputError


@contextmanager
def exclusive(path: Path, refusal: Callable[[str], str]) -> Iterator[None]:
    """Hold the lock file `path` for the block; a second holder is refused at once with
    BadInputError(refusal(HOLDER)), HOLDER being "pid N, since HH:MM:SS" of the first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise BadInputError(refusal(holder)) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the holder removed the file between our open and our lock: take the new one
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}, since {time.strftime('%H:%M:%S')}".encode())
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)
