"""Outputs of long training commands (`finetune`, `gcn train`): a directory that appears only
when complete, and its checkpoint beside it."""

from __future__ import annotations

from pathlib import Path

from edgec.errors import BadInputError


def checkpoint_dir(out: Path) -> Path:
    return out.with_name(out.name + ".checkpoint")


def check_output(out: Path, force: bool, record: str, command: str) -> None:
    """The output may not exist yet, be empty, or (with --force) be an earlier output of
    `command`, recognised by its `record` file."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise BadInputError(f"-o {out} is a file or a link; give a directory path")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise BadInputError(f"-o {out} exists and is not empty; pass --force to replace it or choose another path")
        if not (out / record).is_file():
            raise BadInputError(f"-o {out} is not an edgec {command} output; --force only replaces those, choose another path")
