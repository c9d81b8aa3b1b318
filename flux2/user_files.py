"""Files and paths that users hand us: opened only when they are regular files, read only up to a size limit.

A FIFO named `x.png` blocks the first read forever, a caption that links to /dev/zero never ends, a 50 GB file
given as a caption fills the memory, and a file name that is not UTF-8 cannot be written into a report. Every
reader of a user file (images, captions, manifests, params.yaml, JSON configs) goes through `open_regular` /
`read_limited`, which refuse such files with a `UserFileError` that names the file and the fix; output paths are
checked with `check_writable` before any work starts.
"""
from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, BinaryIO


class UserFileError(ValueError):
    """A user file that cannot be read as it is (not a regular file, too large, not valid JSON), named."""


class FileTooLarge(UserFileError):
    """A user file over the size limit of its kind."""


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode):
        return "a character device (such as /dev/zero)"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """Open `path` for binary reading if it is (or links to) a regular file; UserFileError naming it otherwise.

    Opened non-blocking and checked on the open descriptor, so a FIFO never blocks and nothing can be swapped in
    between the check and the read. FileNotFoundError / PermissionError pass through as they are."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise UserFileError(f"{printable(str(path))} is {_kind(mode)}, not a regular file; replace it with the "
                                "file itself")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_limited(path: str | os.PathLike, limit: int, what: str = "file") -> bytes:
    """The bytes of the regular file `path`, refused (FileTooLarge) when it holds more than `limit` bytes; at most
    limit + 1 bytes are ever read, whatever the file claims."""
    chunks, size = [], 0
    with open_regular(path) as f:
        while size <= limit:  # in chunks: read(limit + 1) would allocate the whole limit up front
            chunk = f.read(min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    data = b"".join(chunks)
    if len(data) > limit:
        raise FileTooLarge(f"{printable(str(path))} is over the {limit:,}-byte limit for {what}; is it the right "
                           "file?")
    return data


def read_json(path: str | os.PathLike, limit: int, what: str, expect: type = dict) -> Any:
    """A JSON file's value, which must be an `expect` (an object by default); UserFileError naming the file."""
    try:
        value = json.loads(read_limited(path, limit, what).decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise UserFileError(f"{path}: {what} is not valid JSON ({one_line(e)}); the file is damaged or "
                            "truncated: copy it again") from None
    if not isinstance(value, expect):
        raise UserFileError(f"{path}: {what} must be a JSON {'object' if expect is dict else expect.__name__}, "
                            f"got {type(value).__name__}; the file is damaged or of another kind")
    return value


def check_writable(path: str | os.PathLike, key: str) -> None:
    """`path` can be written (it is no folder, and its nearest existing folder takes a new file), checked before
    any work starts and without creating anything; UserFileError naming `key` (the setting or option that chose
    the path) otherwise."""
    path = Path(path).absolute()
    existing = next(p for p in path.parents if p.exists())
    problem = None
    if path.is_dir():
        problem = "it is a folder"
    elif not existing.is_dir():
        problem = f"{existing} is a file, not a folder"
    else:
        try:
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as e:
            problem = f"{e.strerror or e} in {existing}"
    if problem:
        raise UserFileError(f"{key}: cannot write {path} ({problem}); choose another path or fix the folder")


def utf8_problem(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be stored as UTF-8 text (a name in another encoding, a lone surrogate), or None."""
    try:
        str(path).encode("utf-8")
        return None
    except UnicodeEncodeError:
        return (f"the name {printable(str(path))} is not valid UTF-8 (another encoding, such as Latin-1?); rename "
                "it, e.g. `convmv -f latin1 -t utf8 --notest FILE`")


def printable(text: str) -> str:
    """`text` as UTF-8-safe text: bytes of a non-UTF-8 file name as \\xNN (the bytes on disk), other lone
    surrogates as \\udNNN, so any name can go into a message, a JSON report or a Parquet column."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def one_line(e: Exception) -> str:
    """An exception's message on one line (for an error that quotes it)."""
    return " ".join(str(e).split())
