"""One cache directory for everything edgec derives and keeps between runs.

Location: $EDGEC_CACHE_DIR, else $XDG_CACHE_HOME/edgec, else ~/.cache/edgec.
Entries are directories built into a temporary sibling and renamed into place
under an exclusive file lock, so two concurrent compiles that need the same
entry build it once and never see it half written.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


def cache_root() -> Path:
    explicit = os.environ.get("EDGEC_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "edgec"


@contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def cached_dir(kind: str, key: str, build: Callable[[Path], None]) -> Path:
    """Return cache/<kind>/<key>, calling build(tmp_dir) once to create it."""
    final = cache_root() / kind / key
    if final.is_dir():
        return final
    with locked(cache_root() / kind / f".{key}.lock"):
        if final.is_dir():  # another process built it while we waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=final.parent))
        try:
            build(tmp)
            tmp.rename(final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


@dataclass(frozen=True)
class CacheEntry:
    kind: str
    key: str
    path: Path
    size_bytes: int


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def list_entries() -> list[CacheEntry]:
    root = cache_root()
    entries: list[CacheEntry] = []
    if not root.is_dir():
        return entries
    for kind_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for entry in sorted(p for p in kind_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            entries.append(CacheEntry(kind_dir.name, entry.name, entry, _dir_size(entry)))
    return entries


def in_use() -> set[str]:
    """Kinds whose entries a running process needs: `devices` (the emulated user space, and
    the pid files that `edgec device status` and `down` find its servers by) while a
    server edgec started is alive."""
    if not (cache_root() / "devices" / "run").is_dir():
        return set()  # no server was ever started (and known_servers() would create the directory)
    from edgec.device_server import known_servers

    return {"devices"} if known_servers() else set()


def clean(kind: str | None = None) -> list[CacheEntry]:
    """Remove every entry (or those of one kind) that no running device needs; returns
    what was removed."""
    busy = in_use()
    removed = [e for e in list_entries() if (kind is None or e.kind == kind) and e.kind not in busy]
    for entry in removed:
        with locked(entry.path.parent / f".{entry.key}.lock"):
            # Rename first: an interrupted delete must not leave a half entry that looks complete.
            trash = Path(tempfile.mkdtemp(prefix=f".{entry.key}.trash-", dir=entry.path.parent))
            entry.path.rename(trash / entry.key)
            shutil.rmtree(trash, ignore_errors=True)
    # Left by builds that were killed (SIGKILL skips their cleanup).
    root = cache_root()
    if root.is_dir():
        for stale in root.glob("*/.*.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        for stale in root.glob("*/.*.trash-*"):
            shutil.rmtree(stale, ignore_errors=True)
    return removed
