"""One writer per folder: a lock file that names its holder and dies with it.

`folder_lock(folder)` holds an flock on `folder/.lock` for a block. The kernel releases an flock when its holder
exits, even by kill -9, so a crashed run never blocks the next one: its lock file is simply taken over. While
held, the file says who holds it (pid, host, since when), so the refusal a second process gets names the first;
on release it is emptied again (the folder's content, and so its DVC hash, stays the same).
"""
from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".lock"


class FolderLockedError(ValueError):
    """Another live process holds the folder's lock; the message names it."""


def holder_text(lock_path: Path) -> str:
    """'pid 123 on host gpu1 since 2026-12-01 11:02:03' from a lock file, or 'an unknown process'."""
    try:
        info = json.loads(lock_path.read_text(encoding="utf-8") or "{}")
        return (f"{info.get('command', 'a process')} (pid {info['pid']} on host {info['host']} since "
                f"{info['since']})")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "an unknown process"


@contextmanager
def folder_lock(folder: str | Path, what: str = "in use", advice: str = "wait for it to finish",
                command: str = "a process") -> Iterator[None]:
    """Hold `folder`'s lock for the block. A FolderLockedError right away if a live process holds it:
    "<folder> is <what>: <holder> holds <its lock file>; <advice>". `command` names this holder in the file."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    with open(path, "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderLockedError(f"{folder} is {what}: {holder_text(path)} holds {path}; {advice}") from None
        f.seek(0)
        stale = f.read().strip()
        if stale:  # a holder that died without emptying it (kill -9): its flock went with it
            print(f"note: taking over {path} from {holder_text(path)}, which is no longer running")
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                            "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            f.flush()
