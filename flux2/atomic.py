"""Files on disk: atomic writes (a reader, or a crashed run, sees either the complete new file or the old one,
never half) and content hashes.

Every stage writes its outputs through these (JSON, Parquet, PNG, ...); safetensors have their own
`safetensors_io.save_file_atomic`.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# The temporary names used here and by safetensors_io.save_file_atomic (`.name.<12 hex>.tmp[.suffix]`), and the one
# safetensors' own save_file writes through before renaming it to our name (`.tmpXXXXXX`, Rust's tempfile crate):
# a kill inside save_file leaves the latter.
TEMPORARY_NAME = re.compile(r"\..+\.[0-9a-f]{12}\.tmp(\.[^.]*)?|\.tmp[A-Za-z0-9]{6}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends without error, move it over `path`.

    The temporary name keeps the suffix (`.manifest.1a2b3c.tmp.parquet`) so writers that pick a format from the
    extension still work. Parent folders are created. On error the temporary file is removed and the error is
    raised again (an OSError as an OSError of the same errno whose message names `path`); `path` is untouched.

        with atomic_path("reports/ingest.json") as tmp:
            tmp.write_text(...)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder = same file system, so os.replace is an atomic rename. Not mkstemp: its files are 0600.
    tmp = path.parent / f".{path.stem}.{secrets.token_hex(6)}.tmp{path.suffix}"
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"could not write {path}: nothing was written to the temporary file {tmp}")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        if e.errno is None or str(path) in str(e):
            raise
        # A full disk, a file-size limit, a vanished folder: name the file the user knows, not the temporary one
        # (OSError(errno, ...) keeps the subclass: ENOSPC stays OSError, ENOENT FileNotFoundError).
        raise OSError(e.errno, f"could not write {path}: {e.strerror or e}") from e
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` as UTF-8 to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented, key-sorted JSON (stable bytes for the same content) to `path` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def remove_temporaries(folder: str | os.PathLike) -> int:
    """Delete the temporary files that writes killed midway (kill -9, power loss) left in `folder` (not below it);
    returns how many. Call it only where no other process is writing into `folder` right now."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    stale = [p for p in folder.iterdir() if TEMPORARY_NAME.fullmatch(p.name) and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def _fsync_dir(folder: Path) -> None:
    # Make the rename itself durable; not every platform/file system lets a folder be opened, which is fine.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
