"""Files the producer reads and writes: what a path is, and output files that are safe to open.

An output file (``--rejects``, ``--out``) is refused before anything is written when it is
one of the command's inputs (the same path, a symbolic or a hard link to it: opening it for
writing would truncate the catalogue being read), a directory, or in a directory that does
not exist. Each refusal is one ConfigError line naming the flag and the path.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from skufleet.schemas.errors import ConfigError


def file_kind(mode: int) -> str:
    """What a path that is not a regular file is (from its ``st_mode``), for an error."""
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def check_output(path: Path, inputs: Iterable[Path] = (), *, flag: str) -> None:
    """Refuse to write ``path`` (given with ``flag``) over one of ``inputs`` or where it cannot
    be created; see the module docstring."""
    parent = path.absolute().parent
    if not parent.is_dir():
        problem = "is not a directory" if parent.exists() else "does not exist"
        raise ConfigError(f"{flag} {path}: the directory {parent} {problem}")
    try:
        found = path.stat()
    except FileNotFoundError:
        return  # a new file cannot be an input
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: {exc.strerror}") from None
    if stat.S_ISDIR(found.st_mode):
        raise ConfigError(f"{flag} {path} is a directory; give a file name")
    for source in inputs:
        try:
            same = os.path.samefile(path, source)
        except OSError:
            continue  # an input that is not there cannot be overwritten
        if same:
            link = "" if path.absolute() == Path(source).absolute() else f" (a link to {source})"
            raise ConfigError(
                f"{flag} {path} is an input of this command{link}: writing it would destroy "
                "it; choose another file"
            )


def open_output(path: Path, inputs: Iterable[Path] = (), *, flag: str) -> TextIO:
    """``path`` opened for writing UTF-8 text, after :func:`check_output`; an OSError (no
    permission, a full disk) becomes one ConfigError line."""
    check_output(path, inputs, flag=flag)
    try:
        return path.open("w", encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot write it: {exc.strerror}") from None
