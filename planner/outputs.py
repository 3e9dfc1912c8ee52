"""Checks on where meshplan will write (plan files, run reports, checkpoints, profiles), made before any work so
that a long run never ends in an unwritable path."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from planner.errors import InputError


def check_writable_dir(path: str | Path, field: str, create: bool = False) -> None:
    """InputError unless `path` is a directory this process can create files in (made first when `create`):
    probed by creating and deleting a file, which also catches read-only file systems when running as root."""
    p = Path(path)
    try:
        if create:
            p.mkdir(parents=True, exist_ok=True)
        if not p.is_dir():
            raise InputError(f"'{p}' is not a directory", field=field)
        fd, probe = tempfile.mkstemp(prefix=".meshplan-probe-", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(f"cannot write in '{p}': {exc.strerror or exc}", field=field) from None


def check_new_output(path: Path, force: bool, field: str) -> None:
    """An output file the user named: refused when it exists (unless `force`), when it exists as anything but a
    regular file (even with `force`: never a device or a directory), or when its directory is
    missing or not writable."""
    try:
        if path.exists() or path.is_symlink():
            if not path.is_file():
                raise InputError(f"'{path}' exists and is not a regular file", field=field)
            if not force:
                raise InputError(f"'{path}' exists; pass --force to overwrite it", field=field)
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise InputError(f"directory '{parent}' does not exist", field=field)
    except OSError as exc:
        raise InputError(f"cannot use '{path}': {exc.strerror or exc}", field=field) from None
    check_writable_dir(parent, field)
