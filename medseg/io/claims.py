"""Per-case claims: runs writing into one output folder at once share its cases instead of doing each twice.

>>> claims = Claims("out/")                                  # doctest: +SKIP
>>> holder = claims.claim("ct_001")   # None: ours now; else who holds it, e.g. "pid 4711 on host 3f2a…"
>>> ...                                # segment, write
>>> claims.release("ct_001")

A claim is an exclusive ``flock`` on ``OUTDIR/.claim-<case>.lock``, taken without waiting. The kernel drops
the lock when its process ends, however it ends (``kill -9`` included), so a dead writer's claim is taken
over by the next run without any staleness rule; the file it leaves is reused. A released claim's file is
deleted while still locked; a run that opened the old file just before sees, after locking, that the path no
longer names the file it locked (the inode differs) and tries again with the new one — so two runs never both
hold one case. The lock file holds the holder's PID and host tag, read only to name the holder in messages.

Sharded parts never claim the same case (each case is in exactly one part); the claim is for two *unsharded*
runs started on one input and output (a user starting the same command twice, a cron job overlapping the
last). ``flock`` works between processes of one machine and on local file systems; NFS clients emulate it
with POSIX locks (Linux ≥ 2.6.12), which other NFS clients see too.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from pathlib import Path

#: Name prefix of claim files: a dot file, never taken for a case or a temporary file.
CLAIM_PREFIX = ".claim-"


def claim_path(folder: str | os.PathLike, case: str) -> Path:
    """``<folder>/.claim-<case>.lock``."""
    return Path(folder) / f"{CLAIM_PREFIX}{case}.lock"


class Claims:
    """The claims this process holds in one folder (``case`` → open, locked file descriptor)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self._held: dict[str, int] = {}

    def claim(self, case: str) -> str | None:
        """Take ``case`` for this process. Returns None when it is ours (also when already held by us), else
        a short description of the live process holding it.

        Raises:
            OSError: the claim file cannot be created (a folder that cannot be written).
        """
        if case in self._held:
            return None
        path = claim_path(self.folder, case)
        for _ in range(100):  # each retry means a holder released between our open and our lock
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                return _holder(path)
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                with contextlib.suppress(OSError):  # who holds it: for messages only
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
                self._held[case] = fd
                return None
            os.close(fd)
        return _holder(path)

    def release(self, case: str) -> None:
        """Give ``case`` back: delete its claim file, then unlock (no-op when not held)."""
        fd = self._held.pop(case, None)
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(claim_path(self.folder, case))
        os.close(fd)

    def release_all(self) -> None:
        for case in list(self._held):
            self.release(case)

    def __enter__(self) -> Claims:
        return self

    def __exit__(self, *exc) -> None:
        self.release_all()


def _holder(path: Path) -> str:
    try:
        pid, host = path.read_text().split()[:2]
    except (OSError, ValueError):
        return "another run"
    return f"another run (pid {pid} on {host})"
