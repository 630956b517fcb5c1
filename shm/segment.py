"""Named POSIX shared-memory segments, owner-only, with a sweep for dead owners.

Every segment luaprobe creates is ``/dev/shm/luaprobe-<ownerpid>-<purpose>.<n>.ns<tag>``,
created ``O_EXCL`` with mode 0600 by the process that owns it; ``tag`` identifies the
boot and the pid namespace (a pid means something only there).  The owner unlinks it
when done; :func:`sweep` (run at every start and by ``luaprobe shm clean``) removes the
segments that are ours and whose owner is gone:

* ours: owned by this effective uid and named with this boot's and namespace's tag;
  another user's or another container's segment is skipped, never judged by a pid
  that means something else here (names without a tag, from older versions: by pid);
* gone: no such process, a zombie (dead but not reaped), or a process started after
  the segment was created (the pid was reused).
"""
from __future__ import annotations

import ctypes
import hashlib
import itertools
import mmap
import os
import re
import shutil

SHM_DIR = "/dev/shm"
PREFIX = "luaprobe-"
_NAME_RE = re.compile(r"^luaprobe-(\d+)-[A-Za-z0-9_.-]+$")
_TAG_RE = re.compile(r"\.ns([0-9a-f]{8})$")
_counter = itertools.count()
_tag = None
_owned: dict[str, str] = {}   # path -> "f" (a segment) / "d" (a flat directory): made by this process, not yet removed
_owned_watch = None           # on_owned_change's callable, given the list as bytes at every change


def identity_tag() -> str:
    """8 hex digits naming this boot and this pid namespace (sha1 of boot_id and /proc/self/ns/pid)."""
    global _tag
    if _tag is None:
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                boot = f.read().strip()
        except OSError:
            boot = "?"
        try:
            ns = os.readlink("/proc/self/ns/pid")
        except OSError:
            ns = "?"
        _tag = hashlib.sha1(f"{boot} {ns}".encode()).hexdigest()[:8]
    return _tag


def _owned_changed() -> None:
    if _owned_watch is None:
        return
    me = os.getpid()                  # a forked child's copy of the list names its parent's segments: never given
    data = b"".join(kind.encode() + os.fsencode(path) + b"\0" for path, kind in _owned.items()
                    if owner_pid(os.path.basename(path)) == me)
    _owned_watch(data)


def own(path: str, kind: str = "f") -> None:
    """``path`` (under /dev/shm, named by this process's pid) is this process's to remove: ``kind`` "f" a segment,
    "d" a flat directory.  :func:`create` owns its segments itself; remove with :func:`disown`."""
    _owned[path] = kind
    _owned_changed()


def disown(path: str) -> None:
    """``path`` was removed (or handed over): no longer on the owned list.  No error when it was not on it."""
    if _owned.pop(path, None) is not None:
        _owned_changed()


def owned() -> dict[str, str]:
    """A copy of the owned list: {path: "f" | "d"} (this process's segments and directories not yet removed)."""
    return dict(_owned)


def on_owned_change(fn) -> None:
    """Call ``fn(bytes)`` now and at every change of the owned list with its entries of this process, each
    ``b"f" + path + b"\\0"`` (a segment) or ``b"d" + path + b"\\0"`` (a directory); None stops.  The fast path gives
    it to its crash handler (engine/plugins/_lpwatch.c crash_paths), which unlinks them when a plug-in's fault kills
    the process: a crash leaves no /dev/shm segment behind (docs/operations.md "Exit codes")."""
    global _owned_watch
    _owned_watch = fn
    _owned_changed()


class Segment:
    """A mapped shared-memory segment.  ``address`` is usable from LuaJIT ffi."""

    def __init__(self, name: str, size: int, mm: mmap.mmap, owner: bool):
        self.name = name
        self.size = size
        self._mm = mm
        self.owner = owner
        self._anchor = ctypes.c_char.from_buffer(mm)
        self.address = ctypes.addressof(self._anchor)

    def populate(self) -> bool:
        """Allocate and map every page now, as ``create(..., populate=True)`` does at mapping time, for a segment
        another process must attach first (the packet ring: the capture process starts before it is populated).
        False where the kernel refuses (before 5.14): the pages are then mapped as they are first touched."""
        try:
            self._mm.madvise(MADV_POPULATE_WRITE)
            return True
        except (OSError, ValueError):
            return False

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
    """A fresh segment name ``luaprobe-<pid>-<purpose>.<n>.ns<tag>`` for this process."""
    pid = os.getpid() if pid is None else pid
    return f"{PREFIX}{pid}-{purpose}.{next(_counter)}.ns{identity_tag()}"


#: mmap flag that maps every page at once (Linux; 0 elsewhere, where the pages are mapped as they are touched)
POPULATE = getattr(mmap, "MAP_POPULATE", 0)
#: madvise(2) advice that allocates and maps every page of a mapping for writing, as POPULATE does when mapping
#: (Linux >= 5.14, include/uapi/asm-generic/mman-common.h; Python's mmap module names it from 3.13 on)
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


def create(purpose: str, size: int, populate: bool = False) -> Segment:
    """Create (O_EXCL, mode 0600) and map a zero-filled segment owned by this process.  ``populate``: allocate and
    map every page now (MAP_POPULATE), so that touching it later takes no page fault: the packet ring, which the
    fast path reads through once per run (32 MiB: ~2 ms here at start-up instead of ~510 faults, 1.3 ms of the
    packet loop's CPU: docs/benchmarks.md, issue 10)."""
    name = make_name(purpose)
    fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED | (POPULATE if populate else 0), mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        unlink(name)
        raise
    os.close(fd)
    own(os.path.join(SHM_DIR, name))
    return Segment(name, size, mm, owner=True)


def attach(name: str, populate: bool = False) -> Segment:
    """Map an existing segment created by another process (not owned here); ``populate`` as in :func:`create`."""
    if not _NAME_RE.match(name):
        raise ValueError(f"not a luaprobe segment name: {name!r}")
    fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_NOFOLLOW)
    try:
        size = os.fstat(fd).st_size
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED | (POPULATE if populate else 0), mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    return Segment(name, size, mm, owner=False)


def unlink(name: str) -> bool:
    """Remove a segment name (or a luaprobe directory such as extracted files); False if already gone."""
    path = os.path.join(SHM_DIR, name)
    disown(path)
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


def _alive(pid: int, created: float | None = None) -> bool:
    """Is ``pid`` a running process (not a zombie) that could have created a segment at ``created``?"""
    import psutil
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        if created is not None and p.create_time() > created + 1.0:
            return False                      # the pid was reused after the segment was made
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True
    return True


def ours(name: str) -> bool:
    """Owned by this effective uid and (when tagged) made in this boot and pid namespace."""
    m = _TAG_RE.search(name)
    if m and m.group(1) != identity_tag():
        return False
    try:
        return os.lstat(os.path.join(SHM_DIR, name)).st_uid == os.geteuid()
    except OSError:
        return False


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
    """Unlink every luaprobe segment that is ours (:func:`ours`) and whose owner is gone (dead, a zombie, or
    its pid reused); skip everything else, never raise for a segment we may not remove.  Returns the names."""
    removed = []
    for name in list_segments():
        pid = owner_pid(name)
        if pid is None or not ours(name):
            continue
        try:
            created = os.lstat(os.path.join(SHM_DIR, name)).st_ctime
        except OSError:
            continue
        if _alive(pid, created):
            continue
        try:
            if unlink(name):
                removed.append(name)
        except OSError:                       # raced with its owner or another sweep, or not removable
            pass
    return removed
