"""Named POSIX shared-memory segments, owner-only, with a sweep for dead owners.

Every segment luaprobe creates is ``/dev/shm/luaprobe-<ownerpid>-<purpose>``,
created ``O_EXCL`` with mode 0600 by the process that owns it.  The owner
unlinks it when done; :func:`sweep` removes segments whose owner pid is gone
(run at every start and by ``luaprobe shm clean``).
"""
from __future__ import annotations

import ctypes
import itertools
import mmap
import os
import re
import shutil

SHM_DIR = "/dev/shm"
PREFIX = "luaprobe-"
_NAME_RE = re.compile(r"^luaprobe-(\d+)-[A-Za-z0-9_.-]+$")
_counter = itertools.count()


class Segment:
    """A mapped shared-memory segment.  ``address`` is usable from LuaJIT ffi."""

    def __init__(self, name: str, size: int, mm: mmap.mmap, owner: bool):
        self.name = name
        self.size = size
        self._mm = mm
        self.owner = owner
        self._anchor = ctypes.c_char.from_buffer(mm)
        self.address = ctypes.addressof(self._anchor)

    @property
    def path(self) -> str:
        """Filesystem path of the segment under /dev/shm."""
        return os.path.join(SHM_DIR, self.name)

    @property
    def buf(self) -> memoryview:
        """A memoryview over the whole mapping."""
        return memoryview(self._mm)

    def close(self) -> None:
        """Unmap; the owner also unlinks the name.  Safe to call twice."""
        if self._mm is None:
            return
        del self._anchor
        try:
            self._mm.close()
        except BufferError:  # a view is still exported; the mapping dies with the process
            pass
        self._mm = None
        if self.owner:
            unlink(self.name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def make_name(purpose: str, pid: int | None = None) -> str:
    """A fresh segment name ``luaprobe-<pid>-<purpose>.<n>`` for this process."""
    pid = os.getpid() if pid is None else pid
    return f"{PREFIX}{pid}-{purpose}.{next(_counter)}"


def create(purpose: str, size: int) -> Segment:
    """Create (O_EXCL, mode 0600) and map a zero-filled segment owned by this process."""
    name = make_name(purpose)
    fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        unlink(name)
        raise
    os.close(fd)
    return Segment(name, size, mm, owner=True)


def attach(name: str) -> Segment:
    """Map an existing segment created by another process (not owned here)."""
    if not _NAME_RE.match(name):
        raise ValueError(f"not a luaprobe segment name: {name!r}")
    fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_NOFOLLOW)
    try:
        size = os.fstat(fd).st_size
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    return Segment(name, size, mm, owner=False)


def unlink(name: str) -> bool:
    """Remove a segment name (or a luaprobe directory such as extracted files); False if already gone."""
    path = os.path.join(SHM_DIR, name)
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def owner_pid(name: str) -> int | None:
    """The owner pid encoded in a luaprobe segment name, else None."""
    m = _NAME_RE.match(name)
    return int(m.group(1)) if m else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_segments(pid: int | None = None) -> list[str]:
    """Names of luaprobe segments in /dev/shm (optionally only those owned by ``pid``)."""
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    out = [n for n in names if owner_pid(n) is not None]
    if pid is not None:
        out = [n for n in out if owner_pid(n) == pid]
    return sorted(out)


def sweep() -> list[str]:
    """Unlink every luaprobe segment whose owner process is dead; return their names."""
    removed = []
    for name in list_segments():
        pid = owner_pid(name)
        if pid is not None and not _alive(pid) and unlink(name):
            removed.append(name)
    return removed
