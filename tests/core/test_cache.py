import multiprocessing
import time
from pathlib import Path

import pytest

from edgec import cache


def _slow_build(path: Path) -> None:
    with open(path.parent.parent / "builds.log", "a") as log:
        log.write("build\n")
    time.sleep(0.5)
    (path / "weights.bin").write_bytes(b"x" * 100)


def _worker(root: str) -> str:
    import os

    os.environ["EDGEC_CACHE_DIR"] = root
    return str(cache.cached_dir("models", "m1", _slow_build))


def test_concurrent_users_build_an_entry_once(tmp_path: Path) -> None:
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        paths = pool.map(_worker, [str(tmp_path)] * 2)
    assert paths[0] == paths[1] == str(tmp_path / "models" / "m1")
    assert (tmp_path / "builds.log").read_text().count("build") == 1
    assert not [p for p in (tmp_path / "models").iterdir() if ".tmp-" in p.name]


def test_failed_build_leaves_nothing_and_list_clean(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEC_CACHE_DIR", str(tmp_path))

    def broken(path: Path) -> None:
        (path / "half").write_text("partial")
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError):
        cache.cached_dir("models", "bad", broken)
    assert cache.list_entries() == []
    cache.cached_dir("models", "good", lambda p: (p / "f").write_bytes(b"12345"))
    assert [(e.kind, e.key, e.size_bytes) for e in cache.list_entries()] == [("models", "good", 5)]
    assert [e.key for e in cache.clean()] == ["good"] and cache.list_entries() == []


def test_cache_root_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("EDGEC_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache.cache_root() == tmp_path / "edgec"
