"""Atomic output folders: a run writes into a hidden sibling folder and renames it into place.

A failed or interrupted run leaves no partial OUT, and an OUT that exists and was not written by
optpipe is refused unless forced (it might be anything the user cares about).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from .errors import UsageError

MARKER = ".optpipe-out"


def is_optpipe_out(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def check_writable(out: str, force: bool) -> None:
    """Refuse early (before any work) to overwrite what optpipe did not write."""
    if os.path.lexists(out):
        if not os.path.isdir(out):
            raise UsageError(f"output {out} exists and is not a folder", "choose another -o")
        if os.listdir(out) and not is_optpipe_out(out) and not force:
            raise UsageError(
                f"output folder {out} exists and was not written by optpipe",
                "choose another -o, or pass --force to replace it",
            )
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise UsageError(f"cannot write {out}: folder {parent} does not exist", "create it first")


@contextlib.contextmanager
def atomic_folder(out: str, force: bool = False):
    """Yields a temporary folder; on success it replaces `out` as a whole."""
    check_writable(out, force)
    out = os.path.abspath(out)
    parent, base = os.path.split(out)
    tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    try:
        yield tmp
        with open(os.path.join(tmp, MARKER), "w") as f:
            f.write("written by optpipe; safe to replace with a new optpipe run\n")
        old = None
        if os.path.lexists(out):
            old = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
            os.rmdir(old)
            os.rename(out, old)
        os.rename(tmp, out)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
