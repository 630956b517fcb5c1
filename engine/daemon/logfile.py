"""supervisor.log rotated by size ([log] max_mb, backups; docs/operations.md "Files").

Every process of a daemon (the supervisor, its fast path, shards, capture, store writer, T.async workers) writes its
log lines to its standard error, inherited from the supervisor.  So that one process owns the file and can rotate it,
the supervisor points its own stdout and stderr (fds 1 and 2, which every child inherits) at a pipe, and a thread
(``LogPump``) copies complete lines from it into the file through the standard library's
``logging.handlers.RotatingFileHandler`` (metrics.RotatingHandler: owner-only files, the same rotation as
stats.jsonl): above ``max_bytes`` the file is renamed to supervisor.log.1 (… .N, the oldest removed) and a new one
begun, so ``tail -F`` and logrotate-free operation work.  A line is never split across two files.
"""
from __future__ import annotations

import logging
import os
import sys
import threading

from .metrics import RotatingHandler

MAX_LINE = 1 << 20          #: a longer run of bytes without a newline is written as one line anyway


class LogPump:
    """fds 1 and 2 of this process (and so of every child started afterwards) -> a pipe -> ``path``, rotated."""

    def __init__(self, path: str, max_bytes: int, backups: int):
        self.handler = RotatingHandler(path, maxBytes=max_bytes, backupCount=backups, delay=True)
        self.handler.setFormatter(logging.Formatter("%(message)s"))
        sys.stdout.flush()
        sys.stderr.flush()
        rfd, wfd = os.pipe()
        os.dup2(wfd, 1)
        os.dup2(wfd, 2)
        os.close(wfd)
        self._rfd = rfd
        self._thread = threading.Thread(target=self._copy, name="supervisor.log", daemon=True)
        self._thread.start()

    def _emit(self, line: bytes) -> None:
        text = line.decode("utf-8", "backslashreplace")
        self.handler.emit(logging.makeLogRecord({"msg": text, "levelno": logging.INFO, "levelname": "INFO"}))

    def _copy(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._rfd, 65536)
            except InterruptedError:
                continue
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                self._emit(line)
            if len(buf) > MAX_LINE:
                self._emit(buf)
                buf = b""
        if buf:
            self._emit(buf)
        self.handler.close()

    def close(self, timeout: float = 2.0) -> None:
        """End of the supervisor: its own ends of the pipe closed, the lines children still write copied until they
        exit (at most ``timeout`` s), the file closed."""
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            null = os.open(os.devnull, os.O_WRONLY)
        except OSError:                         # no descriptor left (EMFILE): close our write ends instead
            os.close(1)
            os.close(2)
        else:
            os.dup2(null, 1)
            os.dup2(null, 2)
            os.close(null)
        self._thread.join(timeout)
