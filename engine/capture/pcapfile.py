"""Capture files for the engine: read-only mmaps walked by ``engine/capture/pcapfile.lua``.

Python only opens and maps the file; every record is read in LuaJIT (the capture
process runs the same Lua walker over :attr:`Capture.address`).
"""
from __future__ import annotations

import ctypes
import mmap
import os
import re
import stat
import threading

from lupa import luajit21

from luaprobe.shm import luajit

__all__ = ["InputError", "Capture", "open_capture", "count_packets"]


class InputError(Exception):
    """A capture file that cannot be read, or is corrupt at byte ``offset``.

    ``str()`` is ``"<path>: byte offset <offset>: <message>"``.  Problems opening
    the file (missing, directory, permissions, empty) are reported at offset 0.
    """

    def __init__(self, path, offset: int, message: str):
        super().__init__(path, offset, message)
        self.path = os.fsdecode(path)
        self.offset = int(offset)
        self.message = message

    def __str__(self) -> str:
        return f"{self.path}: byte offset {self.offset}: {self.message}"


class Capture:
    """A capture file mapped read-only.  ``address`` (int) and ``size`` (bytes) are
    what ``pcapfile.open(addr, size)`` takes in Lua; they stay valid until
    :meth:`close`.  Usable as a context manager."""

    def __init__(self, path, mm: mmap.mmap, size: int, fd: int):
        self.path = os.fsdecode(path)
        self.size = size
        self.fd = fd               #: the mapped file, open read-only (close-on-exec) until close(): capture.lua's size checks
        self._mm = mm
        self._view = _export(mm)   # read-only buffer export: mm cannot be unmapped under the Lua side's pointer
        self.address = int(self._view.buf)

    def size_now(self) -> int:
        """The mapped file's size in bytes now: fstat() of :attr:`fd`, the descriptor the file was mapped from (the
        same file whatever its path names since).  capture.lua ``M.file`` makes the same check in C (``lp_fsize``)
        before it publishes records: a file cut while it is read ends at its new end.  After :meth:`close`: ``size``."""
        return os.fstat(self.fd).st_size if self._mm is not None else self.size

    def close(self) -> None:
        """Unmap the file and close :attr:`fd`.  Pointers the Lua side still holds become invalid."""
        if self._mm is not None:
            _PyBuffer_Release(ctypes.byref(self._view))
            self._view = None
            self._mm.close()
            self._mm = None
            self.address = 0
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Capture":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _PyBuffer(ctypes.Structure):
    """CPython's ``Py_buffer`` (Include/pybuffer.h, stable ABI since 3.11): the address of a read-only mapping,
    which ctypes' ``from_buffer`` refuses (it wants a writable one).  Before, numpy's ``frombuffer`` did this, and
    importing numpy was ~35 ms of the capture process's start-up, which the packet loop waits for (issue 10)."""
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


_PyObject_GetBuffer = ctypes.pythonapi.PyObject_GetBuffer
_PyObject_GetBuffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_PyObject_GetBuffer.restype = ctypes.c_int
_PyBuffer_Release = ctypes.pythonapi.PyBuffer_Release
_PyBuffer_Release.argtypes = [ctypes.POINTER(_PyBuffer)]
_PyBuffer_Release.restype = None


def _export(mm: mmap.mmap) -> _PyBuffer:
    """A PyBUF_SIMPLE export of ``mm`` (holds a reference to it; ``mm.close()`` raises BufferError until
    ``_PyBuffer_Release``); ``.buf`` is its first byte's address.  Raises BufferError if ``mm`` exports none."""
    view = _PyBuffer()
    _PyObject_GetBuffer(mm, ctypes.byref(view), 0)     # ctypes raises the Python error set on failure (-1)
    return view


def open_capture(path) -> Capture:
    """Map the capture file ``path`` read-only; raise :class:`InputError` if it is
    missing, unreadable, not a regular file or empty.  The header is not checked
    here (the Lua walker does that)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise InputError(path, 0, "no such file") from None
    except PermissionError:
        raise InputError(path, 0, "permission denied") from None
    except IsADirectoryError:
        raise InputError(path, 0, "is a directory, not a capture file") from None
    except OSError as e:
        raise InputError(path, 0, f"cannot open: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise InputError(path, 0, "is a directory, not a capture file")
        if not stat.S_ISREG(st.st_mode):
            raise InputError(path, 0, "not a regular file")
        if st.st_size == 0:
            raise InputError(path, 0, "empty file (no capture header)")
        try:
            mm = mmap.mmap(fd, st.st_size, access=mmap.ACCESS_READ)
        except OSError as e:
            raise InputError(path, 0, f"cannot map: {e.strerror}") from None
        cap, fd = Capture(path, mm, st.st_size, fd), -1      # the Capture owns the descriptor now
        return cap
    finally:
        if fd >= 0:
            os.close(fd)


_vm = None
_vm_lock = threading.Lock()
_LUA_ERROR = re.compile(r"offset (\d+): (.*)", re.S)


def _lua_count():
    global _vm
    with _vm_lock:
        if _vm is None:
            lua = luajit.new_runtime()
            _vm = lua.eval('require("luaprobe.engine.capture.pcapfile").count')
        return _vm


def count_packets(path) -> tuple[int, int, InputError | None]:
    """Walk ``path`` in LuaJIT (one Lua call for the whole file).

    Returns ``(packets, captured_bytes, error)``: ``error`` is ``None`` for a clean
    file, otherwise an :class:`InputError` (not raised) locating the first corrupt
    record; the counts cover the records before it.  A file that cannot be opened
    or has no valid capture header raises :class:`InputError`.
    """
    with open_capture(path) as cap:
        count = _lua_count()
        try:
            n, nbytes, err, err_off, _fmt = count(cap.address, cap.size)
        except luajit21.LuaError as e:
            msg = e.args[0] if e.args else str(e)
            if isinstance(msg, bytes):
                msg = msg.decode("utf-8", "replace")
            m = _LUA_ERROR.match(msg.split("\nstack traceback:", 1)[0])
            if m:
                raise InputError(path, int(m.group(1)), m.group(2)) from None
            raise
    error = None
    if err is not None:
        error = InputError(path, int(err_off), err.decode("utf-8", "replace"))
    return int(n), int(nbytes), error
